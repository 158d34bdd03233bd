//! nbdinfo (libnbd-bin) against the server: size, flags, listing, the empty
//! export name, both transports.

use blockd_tests::*;
use serde_json::Value;

/// `nbdinfo --json URI` → the one export object (and the top-level object).
fn nbdinfo_json(uri: &str) -> (Value, Value) {
    let out = tool("nbdinfo", ["--json", uri]);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --json output is not JSON ({e}):\n{}", out.stdout));
    let exports = v["exports"].as_array().expect("exports array").clone();
    assert_eq!(exports.len(), 1, "exports: {exports:?}");
    (v, exports[0].clone())
}

fn assert_export_info(top: &Value, e: &Value, size: u64) {
    assert_eq!(top["protocol"], "newstyle-fixed", "{top}");
    assert_eq!(top["structured"], true, "structured replies: {top}");
    assert_eq!(top["TLS"], false, "{top}");
    assert_eq!(e["export-size"].as_u64(), Some(size), "{e}");
    for key in
        ["can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_cache", "can_multi_conn"]
    {
        assert_eq!(e[key], true, "{key} in {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    let ctx: Vec<&str> =
        e["contexts"].as_array().expect("contexts").iter().filter_map(|c| c.as_str()).collect();
    assert!(ctx.contains(&"base:allocation"), "contexts {ctx:?}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(1), "{e}");
    assert_eq!(e["block_size_preferred"].as_u64(), Some(4096), "{e}");
    assert_eq!(e["block_size_maximum"].as_u64(), Some(32 << 20), "{e}");
}

engine_tests! {
    fn nbdinfo_json_shows_size_and_flags(srv) {
        let (top, e) = nbdinfo_json(&srv.uri());
        assert_eq!(e["export-name"], EXPORT, "{e}");
        assert_export_info(&top, &e, srv.size());
    }

    fn nbdinfo_size_and_can(srv) {
        let out = tool("nbdinfo", ["--size", &srv.uri()]);
        assert_eq!(out.stdout.trim(), srv.size().to_string());
        // `--can X` exits 0 for true, 2 for false.
        for what in ["connect", "read", "write", "flush", "fua", "trim", "zero",
                     "fast-zero", "cache", "multi-conn", "structured-reply"] {
            tool("nbdinfo", ["--can", what, &srv.uri()]);
        }
        let ro = run_capture(
            std::process::Command::new(require("nbdinfo")).args(["--is", "read-only", &srv.uri()]),
            tools::TOOL_TIMEOUT,
        );
        assert_eq!(ro.status.code(), Some(2), "read-only must be false\n{}", ro.describe());
    }

    fn nbdinfo_list_shows_r0(srv) {
        let out = tool("nbdinfo", ["--list", "--json", &srv.uri_export("")]);
        let v: Value = serde_json::from_str(&out.stdout).expect("json");
        let names: Vec<&str> = v["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .filter_map(|e| e["export-name"].as_str())
            .collect();
        assert!(names.contains(&EXPORT), "exports listed: {names:?}");
        let e = v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["export-name"] == EXPORT)
            .unwrap();
        assert_eq!(e["export-size"].as_u64(), Some(srv.size()));
        // The human-readable listing too.
        let out = tool("nbdinfo", ["--list", &srv.uri_export("")]);
        assert!(out.stdout.contains("export=\"r0\""), "{}", out.stdout);
    }

    fn nbdinfo_empty_export_name_selects_r0(srv) {
        let (top, e) = nbdinfo_json(&srv.uri_export(""));
        assert_export_info(&top, &e, srv.size());
    }

    fn nbdinfo_unknown_export_is_refused(srv) {
        let out = run_capture(
            std::process::Command::new(require("nbdinfo")).arg(srv.uri_export("no-such-export")),
            tools::TOOL_TIMEOUT,
        );
        assert!(!out.status.success(), "unknown export accepted\n{}", out.describe());
        assert!(out.stderr.contains("opt_go") || out.stderr.contains("export"),
                "{}", out.describe());
        // The server is still fine afterwards.
        nbdinfo_json(&srv.uri());
    }

    fn nbdinfo_over_tcp(srv = Opts::new().tcp()) {
        let (top, e) = nbdinfo_json(&srv.tcp_addr().uri(EXPORT));
        assert!(e["uri"].as_str().unwrap_or("").starts_with("nbd://127.0.0.1:"), "{e}");
        assert_export_info(&top, &e, srv.size());
        if !srv.kind.is_nbdkit() {
            // blockd listens on every configured address at once.
            let (top, e) = nbdinfo_json(&srv.unix_addr().uri(EXPORT));
            assert_export_info(&top, &e, srv.size());
        }
    }

    fn libnbd_reports_flags_and_block_sizes(srv) {
        nbdcheck("info", &[srv.uri(), srv.size().to_string()]);
    }
}
