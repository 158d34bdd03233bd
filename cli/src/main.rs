//! `blockctl`: the operator CLI (SPEC §8.1). It talks to a running node through its
//! control socket (JSON lines) and never touches the disks of a running resource;
//! `create-md` and `show` work on a stopped node.
//!
//! Exit codes: 0 done; 1 refused or failed (stderr says why); 2 usage or config error.

mod all;
mod attach;
mod certs;
mod client;
mod discarded;

use std::path::PathBuf;
use std::process::ExitCode;

use blockctl::{Cli, Verb};
use blockd::config::{Config, NodeConfig};
use clap::Parser;

/// A failure with its exit code.
struct Fail(u8, String);

fn usage(msg: impl std::fmt::Display) -> Fail {
    Fail(2, msg.to_string())
}

fn refused(msg: impl std::fmt::Display) -> Fail {
    Fail(1, msg.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            eprintln!("blockctl: {msg}");
            ExitCode::from(code)
        }
    }
}

/// Where a verb's config comes from: `--config`, else `CONFIG_DIR/RESOURCE.toml`.
struct Paths {
    config: Option<PathBuf>,
    dir: PathBuf,
}

/// Loads the config (`--config`, else `CONFIG_DIR/RESOURCE.toml`) and checks that
/// a named resource matches it.
fn load(paths: &Paths, resource: Option<&str>) -> Result<Config, Fail> {
    let path = match (&paths.config, resource) {
        (Some(path), _) => path.clone(),
        (None, Some(res)) => paths.dir.join(format!("{res}.toml")),
        (None, None) => return Err(usage("name a RESOURCE or pass --config FILE")),
    };
    let config = Config::load(&path).map_err(usage)?;
    if let Some(res) = resource.filter(|r| *r != config.resource.name) {
        return Err(usage(format!(
            "{}: defines resource {:?}, not {res:?}",
            path.display(),
            config.resource.name
        )));
    }
    Ok(config)
}

/// A verb that is one control request without arguments.
fn simple(paths: &Paths, resource: Option<String>, node: Option<&str>, cmd: &str) -> Result<(), Fail> {
    let config = load(paths, resource.as_deref())?;
    let node = local(&config, node)?;
    client::request(&node, &serde_json::json!({ "cmd": cmd })).map(drop)
}

fn local(config: &Config, node: Option<&str>) -> Result<NodeConfig, Fail> {
    config.local_node(node).cloned().map_err(usage)
}

fn run(cli: Cli) -> Result<(), Fail> {
    let node_arg = cli.node.as_deref();
    let paths = Paths { config: cli.config, dir: cli.config_dir };
    match cli.verb {
        Verb::Show { resource } => {
            let config = load(&paths, resource.as_deref())?;
            if node_arg.is_some() {
                local(&config, node_arg)?;
            }
            print!("{}", config.effective_toml());
            Ok(())
        }
        Verb::GenCerts { resource, out_dir, days, sans } => {
            let config = load(&paths, resource.as_deref())?;
            if node_arg.is_some() {
                local(&config, node_arg)?;
            }
            certs::gen_certs(&config, certs::GenCerts { out_dir, days, sans })
        }
        Verb::CreateMd { resource, force, clear_bitmap } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::create_md(&config, &node, force, clear_bitmap)
        }
        Verb::Up { resource, log } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::up(&config, &node, log)
        }
        Verb::Down { resource } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::down(&node)
        }
        Verb::Primary { resource, force } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "primary", "force": force})).map(drop)
        }
        Verb::Secondary { resource, force } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "secondary", "force": force})).map(drop)
        }
        Verb::Connect { resource, discard_my_data } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            let cmd = serde_json::json!({"cmd": "connect", "discard_my_data": discard_my_data});
            client::request(&node, &cmd).map(drop)
        }
        Verb::DumpMd { resource } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::dump_md(&node)
        }
        Verb::ExportDiscarded { resource, output, journal, base } => {
            let journal = match journal {
                Some(path) => path,
                None => {
                    let config = load(&paths, resource.as_deref())?;
                    let node = local(&config, node_arg)?;
                    discarded::newest(&node.undo_dir, &config.resource.name)?
                }
            };
            discarded::export(&journal, &output, base.as_deref())
        }
        Verb::Disconnect { resource } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "disconnect"})).map(drop)
        }
        Verb::Verify { resource, repair } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            let result =
                client::request_long(&node, &serde_json::json!({"cmd": "verify", "repair": repair}))?;
            let field = |k: &str| result.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            println!(
                "verify: {} bytes out of sync of {} compared{}",
                field("out_of_sync_bytes"),
                field("verified_bytes"),
                if repair { "; resync started for them" } else { "" }
            );
            Ok(())
        }
        Verb::Status { resource: None, json, verbose } if paths.config.is_none() => {
            all::status(&paths.dir, node_arg, json, verbose)
        }
        Verb::Status { resource, json, verbose } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            let status = client::request(&node, &serde_json::json!({"cmd": "status"}))?;
            if json {
                println!("{status}");
            } else {
                print!("{}", client::human_status(&status, verbose));
            }
            Ok(())
        }
        Verb::Events { resource, json, now } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::events(&node, json, now)
        }
        Verb::Attach {
            resource,
            device,
            connections,
            timeout_secs,
            dead_conn_timeout_secs,
            ioctl,
            foreground,
            log,
        } => {
            let config = load(&paths, Some(&resource))?;
            let opts = attach::AttachOptions {
                device,
                connections,
                timeout_secs,
                dead_conn_timeout_secs,
                force_ioctl: ioctl,
                foreground,
                log,
            };
            attach::attach(&config, opts)
        }
        Verb::Detach { first, device, force } => {
            let (resource, device) = match &device {
                Some(device) => (Some(first.as_str()), device),
                None => (None, &first),
            };
            attach::detach(resource, std::path::Path::new(device), force)
        }
        Verb::Invalidate { resource } => simple(&paths, resource, node_arg, "invalidate"),
        Verb::InvalidateRemote { resource } => simple(&paths, resource, node_arg, "invalidate-remote"),
        Verb::PauseSync { resource } => simple(&paths, resource, node_arg, "pause-sync"),
        Verb::ResumeSync { resource } => simple(&paths, resource, node_arg, "resume-sync"),
        Verb::DetachDisk { resource } => simple(&paths, resource, node_arg, "detach-disk"),
        Verb::AttachDisk { resource } => {
            let config = load(&paths, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            let result = client::request(&node, &serde_json::json!({"cmd": "attach-disk"}))?;
            println!(
                "node {} runs again with its disk ({}); resync follows on connect",
                node.name,
                result["disk"].as_str().unwrap_or("?")
            );
            Ok(())
        }
    }
}
