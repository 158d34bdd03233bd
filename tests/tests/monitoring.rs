//! The Prometheus alerting rules and the Grafana dashboard in `monitoring/`:
//! `promtool check rules` accepts the rules, `promtool test rules` runs their unit
//! tests against synthetic series (each alert fires where it should and stays quiet
//! where it should not), and every `blockd_*` metric either file uses is one the
//! metrics endpoint exports.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blockd_tests::tools::{require, run_capture};
use blockd_tests::workspace_root;

fn promtool(args: &[&str]) {
    let mut cmd = Command::new(require("promtool"));
    cmd.args(args).current_dir(workspace_root().join("monitoring"));
    let out = run_capture(&mut cmd, Duration::from_secs(120));
    assert!(out.status.success(), "{}", out.describe());
}

#[test]
fn promtool_checks_the_alerting_rules() {
    promtool(&["check", "rules", "prometheus-alerts.yml"]);
}

#[test]
fn promtool_unit_tests_pass() {
    promtool(&["test", "rules", "prometheus-alerts.test.yml"]);
}

/// Every metric name the endpoint serves (histograms with their series suffixes).
fn exported() -> BTreeSet<String> {
    let sources = blockd::metrics::Sources {
        resource: "r0".into(),
        node: "alpha".into(),
        metrics: Arc::default(),
        nbd: Arc::default(),
        peer: Arc::default(),
    };
    let mut names = BTreeSet::new();
    for line in blockd::metrics::render(&sources).lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|r| r.split_once(' ')) {
            names.insert(name.to_string());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    names
}

/// The `blockd_*` identifiers in `text`.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("blockd_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let exported = exported();
    let dir = workspace_root().join("monitoring");
    for file in ["prometheus-alerts.yml", "prometheus-alerts.test.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(dir.join(file)).expect("read");
        let used = referenced(&text);
        assert!(!used.is_empty(), "{file} uses no blockd metric");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(unknown.is_empty(), "{file} uses metrics the endpoint does not export: {unknown:?}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap())
            .expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let with_queries =
        panels.iter().filter(|p| p["targets"].as_array().is_some_and(|t| !t.is_empty())).count();
    assert!(with_queries >= 10, "{with_queries} panels with queries");
}
