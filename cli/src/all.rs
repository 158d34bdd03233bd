//! `blockctl status` without a resource: every resource configured in the config
//! directory (`/etc/blockd/*.toml`, or `--config-dir` / `BLOCKD_CONFIG_DIR`) that
//! has a node on this host (the host name, or `--node`), like `drbdadm status`.
//!
//! Resources whose node is not running are listed as stopped. A file that does not
//! parse is reported on stderr and the others are still shown; the exit code then
//! says something was wrong (2 for a config error, 1 for a node that did not answer).

use std::path::{Path, PathBuf};

use blockd::config::Config;
use serde_json::Value;

use crate::{Fail, client, refused, usage};

/// One resource's entry: its status object with `"running": true`, or a stopped one.
fn entry(config: &Config, node_arg: Option<&str>) -> Option<Result<Value, String>> {
    // Resources without a node for this host are not ours to show.
    let node = config.local_node(node_arg).ok()?;
    Some(match client::try_status(node) {
        Ok(Some(mut status)) => {
            status["running"] = Value::Bool(true);
            Ok(status)
        }
        Ok(None) => Ok(serde_json::json!({
            "resource": config.resource.name,
            "node": node.name,
            "running": false,
        })),
        Err(e) => Err(format!("{} (node {}): {e}", config.resource.name, node.name)),
    })
}

/// The `*.toml` files of `dir`, sorted by name.
fn config_files(dir: &Path) -> Result<Vec<PathBuf>, Fail> {
    let read = std::fs::read_dir(dir).map_err(|e| usage(format!("cannot read {}: {e}", dir.display())))?;
    let mut files: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

pub fn status(dir: &Path, node_arg: Option<&str>, json: bool, verbose: bool) -> Result<(), Fail> {
    let mut shown = Vec::new();
    let (mut bad_configs, mut failed) = (0, 0);
    for file in config_files(dir)? {
        let config = match Config::load(&file) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("blockctl: {e}");
                bad_configs += 1;
                continue;
            }
        };
        match entry(&config, node_arg) {
            None => {}
            Some(Ok(status)) => shown.push(status),
            Some(Err(e)) => {
                eprintln!("blockctl: {e}");
                failed += 1;
            }
        }
    }
    if json {
        println!("{}", Value::Array(shown));
    } else if shown.is_empty() {
        println!("no resource in {}/*.toml has a node on this host", dir.display());
    } else {
        for status in &shown {
            if status["running"] == Value::Bool(true) {
                print!("{}", client::human_status(status, verbose));
            } else {
                println!("{} stopped\n  node:{}", text(&status["resource"]), text(&status["node"]));
            }
            // Blank lines between resources, as `drbdadm status` prints them.
            println!();
        }
    }
    if bad_configs > 0 {
        return Err(usage(format!("{bad_configs} config file(s) in {} are not valid", dir.display())));
    }
    if failed > 0 {
        return Err(refused(format!("{failed} running node(s) did not answer")));
    }
    Ok(())
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}
