//! The generated files exist and the config page documents exactly the keys the
//! parser accepts.

use std::collections::BTreeSet;

use super::*;

/// The keys documented in the section headed `heading` of blockd.toml(5): each
/// entry is `.TP`, then `.B key`, and must say its default (or that it is required).
fn documented_keys(heading: &str) -> BTreeSet<String> {
    let section = BLOCKD_TOML
        .split("\n.SH ")
        .find(|s| s.starts_with(&format!("\"{heading}\"")))
        .unwrap_or_else(|| panic!("blockd.toml.5 has no section .SH \"{heading}\""));
    let mut keys = BTreeSet::new();
    for entry in section.split("\n.TP\n").skip(1) {
        let first = entry.lines().next().unwrap_or_default();
        let key =
            first.strip_prefix(".B ").unwrap_or_else(|| panic!("entry starts with {first:?}, not .B KEY"));
        let key = key.replace("\\-", "-");
        assert!(
            entry.contains("Default:") || entry.contains("Required."),
            "blockd.toml.5: key {key} in {heading} says neither its default (Default: …) nor Required."
        );
        assert!(keys.insert(key.clone()), "blockd.toml.5: key {key} twice in {heading}");
    }
    keys
}

fn temp_out(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("blockd-docgen-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn check_table(heading: &str, accepted: &[&str]) {
    let accepted: BTreeSet<String> = accepted.iter().map(|k| k.to_string()).collect();
    assert!(!accepted.is_empty(), "no keys read from the parser for {heading} (a flattened struct?)");
    let documented = documented_keys(heading);
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "config keys the parser accepts but docgen/man/blockd.toml.5 does not document in \
         {heading}: {missing:?} (add a .TP/.B entry with its default and unit)"
    );
    let stale: Vec<_> = documented.difference(&accepted).collect();
    assert!(stale.is_empty(), "blockd.toml.5 documents keys the parser refuses in {heading}: {stale:?}");
}

#[test]
fn every_resource_key_is_documented() {
    check_table("THE [resource] TABLE", blockd::config::resource_keys());
}

#[test]
fn every_node_key_is_documented() {
    check_table("THE [[node]] TABLES", blockd::config::node_keys());
}

#[test]
fn writes_every_output_with_every_verb() {
    let out = temp_out("outputs");
    generate(&out).expect("generate");
    for name in OUTPUTS {
        let len = std::fs::metadata(out.join(name)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{name} missing or empty");
    }
    let page = std::fs::read_to_string(out.join("blockctl.8")).unwrap();
    for verb in blockctl::Cli::command().get_subcommands() {
        assert!(page.contains(&format!(".SS {}\n", verb.get_name())), "blockctl.8 lacks {}", verb.get_name());
    }
    let _ = std::fs::remove_dir_all(&out);
}
