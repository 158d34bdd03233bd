//! `blockctl`: the operator CLI (SPEC §8.1). Today it has `show`, which prints the
//! effective config of a resource; the verbs that talk to a running node (`status`,
//! `primary`, `secondary`, ...) arrive with the control socket.
//!
//! Exit codes: 0 done; 1 refused or failed; 2 usage or config error.

use std::path::PathBuf;
use std::process::ExitCode;

use blockd::config::Config;
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
    /// Print the effective config (every key, defaults filled in) after validating it.
    Show {
        /// Resource name; selects /etc/blockd/RESOURCE.toml when --config is absent.
        resource: Option<String>,
    },
}

/// The config file: `--config`, else `/etc/blockd/RESOURCE.toml`.
fn config_path(config: Option<PathBuf>, resource: Option<&str>) -> Result<PathBuf, String> {
    match (config, resource) {
        (Some(path), _) => Ok(path),
        (None, Some(res)) => Ok(PathBuf::from(format!("/etc/blockd/{res}.toml"))),
        (None, None) => Err("name a RESOURCE or pass --config FILE".to_string()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.verb {
        Verb::Show { resource } => {
            let path = match config_path(cli.config, resource.as_deref()) {
                Ok(p) => p,
                Err(e) => return usage(&e),
            };
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return usage(&e),
            };
            if let Some(res) = resource.filter(|r| *r != config.resource.name) {
                return usage(&format!(
                    "{}: defines resource {:?}, not {res:?}",
                    path.display(),
                    config.resource.name
                ));
            }
            if let Some(node) = cli.node.as_deref()
                && let Err(e) = config.local_node(Some(node))
            {
                return usage(&e);
            }
            print!("{}", config.effective_toml());
            ExitCode::SUCCESS
        }
    }
}

fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("blockctl: {e}");
    ExitCode::from(2)
}
