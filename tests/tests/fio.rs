//! fio's nbd engine (libnbd; one connection per job) with crc32c
//! verification, each job in its own region of the export.

use blockd_tests::*;
use serde_json::Value;

/// Runs fio with JSON output; asserts no job error and that I/O happened.
fn fio(srv: &Server, extra: &[&str]) -> Value {
    let uri = format!("--uri={}", srv.uri());
    let mut args = vec![
        "--name=blockd",
        "--ioengine=nbd",
        uri.as_str(),
        "--output-format=json",
        "--group_reporting",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--runtime=180",
    ];
    args.extend(extra);
    // fio leaves verify state files in its working directory: use the
    // test's temp dir.
    let out = run_ok(
        std::process::Command::new(require("fio")).current_dir(srv.dir.path()).args(&args),
        blockd_tests::tools::TOOL_TIMEOUT,
    );
    let json_start = out.stdout.find('{').expect("fio JSON output");
    let v: Value = serde_json::from_str(&out.stdout[json_start..])
        .unwrap_or_else(|e| panic!("fio JSON ({e})\n{}", out.describe()));
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "fio job error\n{}", out.describe());
    let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert!(written > 0 && read > 0, "no I/O: wrote {written} read {read}");
    v
}

engine_tests! {
    fn fio_randrw_4_jobs_verify_crc32c(srv = Opts::new().size(256 * MIB)) {
        fio(&srv, &["--rw=randrw", "--bs=4k", "--iodepth=16", "--numjobs=4",
                    "--size=64M", "--offset_increment=64M"]);
    }

    fn fio_mixed_block_sizes_with_flush_verify(srv = Opts::new().size(256 * MIB)) {
        // FLUSH every 32 writes (--fsync sends NBD_CMD_FLUSH with this engine).
        fio(&srv, &["--rw=randwrite", "--bsrange=512-256k", "--iodepth=8",
                    "--numjobs=2", "--size=32M", "--offset_increment=128M",
                    "--fsync=32"]);
    }
}
