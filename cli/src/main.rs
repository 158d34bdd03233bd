//! `blockctl`: the operator CLI (SPEC §8.1). It talks to a running node through its
//! control socket (JSON lines) and never touches the disks of a running resource;
//! `create-md` and `show` work on a stopped node.
//!
//! Exit codes: 0 done; 1 refused or failed (stderr says why); 2 usage or config error.

mod attach;
mod client;

use std::path::PathBuf;
use std::process::ExitCode;

use blockd::config::{Config, NodeConfig};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "blockctl", version, about = "Operate blockd resources")]
struct Cli {
    /// The resource's config file (default /etc/blockd/RESOURCE.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// This node's name (default: the host name).
    #[arg(long, global = true)]
    node: Option<String>,
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Initialize this node's metadata (the node must be stopped).
    CreateMd {
        resource: Option<String>,
        /// Overwrite existing metadata.
        #[arg(long)]
        force: bool,
        /// The disks of both nodes are known to be identical (e.g. both empty): skip
        /// the initial full sync. Use on both nodes.
        #[arg(long)]
        clear_bitmap: bool,
    },
    /// Start blockd for this node in the background; returns once it answers.
    Up {
        resource: Option<String>,
        /// Where blockd logs (default /var/log/blockd/RESOURCE-NODE.log).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Stop this node's blockd cleanly.
    Down { resource: Option<String> },
    /// Make this node Primary (refused while the peer is Primary or the local disk is
    /// not UpToDate, unless --force).
    Primary {
        resource: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Make this node Secondary (refused while NBD clients are connected, unless --force).
    Secondary {
        resource: Option<String>,
        #[arg(long)]
        force: bool,
    },
    /// Show role, disk, connection and replication state.
    Status {
        resource: Option<String>,
        /// One JSON object (SPEC §8.1 fields).
        #[arg(long)]
        json: bool,
        /// Add counters (bytes replicated and sent for resync, unsent bytes,
        /// activity log, generations).
        #[arg(long, short)]
        verbose: bool,
    },
    /// Stream state changes (`exists` lines first, then `change` lines) until
    /// interrupted, like `drbdsetup events2`.
    Events {
        resource: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Print the current state and exit.
        #[arg(long)]
        now: bool,
    },
    /// Discard this node's data and resync it in full from the peer (Secondary only).
    Invalidate { resource: Option<String> },
    /// Discard the peer's data and resync it in full from this node (the peer must
    /// be Secondary).
    InvalidateRemote { resource: Option<String> },
    /// Hold resync (now and later) until `resume-sync`.
    PauseSync { resource: Option<String> },
    /// Let resync go on after `pause-sync`.
    ResumeSync { resource: Option<String> },
    /// Connect to the peer again (after a split brain or `disconnect`). With
    /// --discard-my-data this node drops its changes and resyncs from the peer.
    Connect {
        resource: Option<String>,
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Close the connection to the peer; this node stays StandAlone until `connect`.
    Disconnect { resource: Option<String> },
    /// Compare every granule with the peer (digests) while in use; waits until done
    /// and prints the bytes found out of sync. With --repair, resyncs them.
    Verify {
        resource: Option<String>,
        #[arg(long)]
        repair: bool,
    },
    /// Print this node's metadata (the node must be stopped).
    DumpMd { resource: Option<String> },
    /// Print the effective config (every key, defaults filled in) after validating it.
    Show { resource: Option<String> },
    /// Attach the resource's Primary as a kernel block device (/dev/nbdN) through the
    /// kernel NBD client. Tries every node's `nbd` address; a resident process stays
    /// to reconnect the device to the new Primary after a failover (I/O waits up to
    /// --dead-conn-timeout-secs meanwhile). Needs root and the nbd module.
    Attach {
        resource: String,
        /// The device, e.g. /dev/nbd0.
        device: PathBuf,
        /// Connections (sockets) per device; more than 1 needs a multi-conn export.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Per-request I/O timeout: a request unanswered this long marks its
        /// connection dead and is retried on the reconnected one.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// How long I/O waits for a reconnect after every connection died (then it
        /// fails with EIO).
        #[arg(long, default_value_t = 120)]
        dead_conn_timeout_secs: u64,
        /// Use the legacy ioctl interface even where netlink is available (no
        /// reconnect after a failover).
        #[arg(long)]
        ioctl: bool,
        /// Stay in the foreground instead of leaving a resident process.
        #[arg(long)]
        foreground: bool,
        /// Where the resident logs (default /var/log/blockd/attach-nbdN.log).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Disconnect a device attached with `attach`. Refused while it is mounted, held
    /// or open, unless --force.
    Detach {
        /// The device (/dev/nbdN); or the resource, which the device must be
        /// attached to, followed by the device.
        #[arg(value_name = "RESOURCE|DEVICE")]
        first: String,
        /// The device, when the first argument names the resource.
        device: Option<String>,
        /// Disconnect even while in use: outstanding and later I/O fails.
        #[arg(long)]
        force: bool,
    },
}

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

/// Loads the config (`--config`, else `/etc/blockd/RESOURCE.toml`) and checks that
/// a named resource matches it.
fn load(config: Option<PathBuf>, resource: Option<&str>) -> Result<Config, Fail> {
    let path = match (config, resource) {
        (Some(path), _) => path,
        (None, Some(res)) => PathBuf::from(format!("/etc/blockd/{res}.toml")),
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
fn simple(
    config: Option<PathBuf>,
    resource: Option<String>,
    node: Option<&str>,
    cmd: &str,
) -> Result<(), Fail> {
    let config = load(config, resource.as_deref())?;
    let node = local(&config, node)?;
    client::request(&node, &serde_json::json!({ "cmd": cmd })).map(drop)
}

fn local(config: &Config, node: Option<&str>) -> Result<NodeConfig, Fail> {
    config.local_node(node).cloned().map_err(usage)
}

fn run(cli: Cli) -> Result<(), Fail> {
    let node_arg = cli.node.as_deref();
    match cli.verb {
        Verb::Show { resource } => {
            let config = load(cli.config, resource.as_deref())?;
            if node_arg.is_some() {
                local(&config, node_arg)?;
            }
            print!("{}", config.effective_toml());
            Ok(())
        }
        Verb::CreateMd { resource, force, clear_bitmap } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::create_md(&config, &node, force, clear_bitmap)
        }
        Verb::Up { resource, log } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::up(&config, &node, log)
        }
        Verb::Down { resource } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::down(&node)
        }
        Verb::Primary { resource, force } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "primary", "force": force})).map(drop)
        }
        Verb::Secondary { resource, force } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "secondary", "force": force})).map(drop)
        }
        Verb::Connect { resource, discard_my_data } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            let cmd = serde_json::json!({"cmd": "connect", "discard_my_data": discard_my_data});
            client::request(&node, &cmd).map(drop)
        }
        Verb::DumpMd { resource } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::dump_md(&node)
        }
        Verb::Disconnect { resource } => {
            let config = load(cli.config, resource.as_deref())?;
            let node = local(&config, node_arg)?;
            client::request(&node, &serde_json::json!({"cmd": "disconnect"})).map(drop)
        }
        Verb::Verify { resource, repair } => {
            let config = load(cli.config, resource.as_deref())?;
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
        Verb::Status { resource, json, verbose } => {
            let config = load(cli.config, resource.as_deref())?;
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
            let config = load(cli.config, resource.as_deref())?;
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
            let config = load(cli.config, Some(&resource))?;
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
        Verb::Invalidate { resource } => simple(cli.config, resource, node_arg, "invalidate"),
        Verb::InvalidateRemote { resource } => simple(cli.config, resource, node_arg, "invalidate-remote"),
        Verb::PauseSync { resource } => simple(cli.config, resource, node_arg, "pause-sync"),
        Verb::ResumeSync { resource } => simple(cli.config, resource, node_arg, "resume-sync"),
    }
}
