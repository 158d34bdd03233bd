//! `blockctl attach` / `detach` on this host, which has no kernel NBD module
//! (`research/test-machine.md`): argument checks and the "module not loaded"
//! refusal, each with its exit code and message. The kernel path itself (netlink
//! CONNECT, RECONFIGURE after a failover, ioctl fallback, busy detach) runs against a
//! real kernel in `vm-tests/run`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use blockd_tests::pair::binary;
use blockd_tests::{TempDir, run_capture};

const DEADLINE: Duration = Duration::from_secs(30);

fn config(dir: &TempDir) -> String {
    let d = dir.path().display();
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:1\"\n\
         nbd = \"unix:{d}/a.nbd\"\ndisk = \"{d}/a.img\"\nmeta = \"internal\"\n\n[[node]]\nname = \"beta\"\n\
         replication = \"127.0.0.1:2\"\nnbd = \"unix:{d}/b.nbd\"\ndisk = \"{d}/b.img\"\nmeta = \"internal\"\n"
    );
    let path = dir.path().join("r0.toml");
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// Runs blockctl and checks the exit code and that stderr contains `needle`.
fn expect(args: &[&str], code: i32, needle: &str) {
    let out = run_capture(Command::new(binary("blockctl")).args(args), DEADLINE);
    assert_eq!(out.status.code(), Some(code), "{}", out.describe());
    assert!(out.stderr.contains(needle), "wanted {needle:?} in stderr: {}", out.describe());
    assert!(out.stdout.is_empty(), "{}", out.describe());
}

#[test]
fn attach_and_detach_check_their_arguments() {
    let dir = TempDir::new("attach-args");
    let cfg = config(&dir);
    expect(&["--config", &cfg, "attach", "r0", "/dev/sda"], 2, "not an NBD device (expected /dev/nbdN)");
    expect(
        &["--config", &cfg, "attach", "r0", "/dev/nbd0", "--connections", "0"],
        2,
        "--connections must be 1..=16",
    );
    expect(
        &["--config", &cfg, "attach", "r0", "/dev/nbd0", "--timeout-secs", "0"],
        2,
        "--timeout-secs must be at least 1",
    );
    expect(&["--config", &cfg, "attach", "r1", "/dev/nbd0"], 2, "defines resource \"r0\", not \"r1\"");
    expect(&["--config", &cfg, "attach", "r0"], 2, "required");
    expect(&["detach", "/dev/loop0"], 2, "not an NBD device");
    expect(&["detach", "r0", "/dev/nbd0", "extra"], 2, "unexpected argument");
}

#[test]
fn attach_without_the_nbd_module_says_how_to_load_it() {
    // This machine kind cannot load nbd; if a host ever can, this test must move
    // into vm-tests rather than attach a device on the CI host.
    assert!(
        !Path::new("/sys/module/nbd").exists(),
        "this host has the nbd module loaded; the kernel path is tested in vm-tests, not here"
    );
    let dir = TempDir::new("attach-nomod");
    let cfg = config(&dir);
    let want = "the nbd module is not loaded (`modprobe nbd`)";
    expect(&["--config", &cfg, "attach", "r0", "/dev/nbd0"], 1, want);
    expect(&["--config", &cfg, "attach", "r0", "/dev/nbd3", "--ioctl"], 1, want);
    expect(&["detach", "/dev/nbd0"], 1, want);
    expect(&["detach", "r0", "/dev/nbd0", "--force"], 1, want);
}

#[test]
fn attach_to_an_export_that_requires_tls_everywhere_says_the_kernel_cannot() {
    let dir = TempDir::new("attach-tls");
    let d = dir.path().display();
    let tls = format!("nbd-tls = \"require\"\nnbd-tls-cert = \"{d}/c.pem\"\nnbd-tls-key = \"{d}/k.pem\"\n");
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:1\"\n\
         nbd = \"127.0.0.1:3\"\ndisk = \"{d}/a.img\"\nmeta = \"internal\"\n{tls}\n[[node]]\nname = \"beta\"\n\
         replication = \"127.0.0.1:2\"\nnbd = \"127.0.0.1:4\"\ndisk = \"{d}/b.img\"\nmeta = \"internal\"\n{tls}"
    );
    let cfg = dir.path().join("r0.toml");
    std::fs::write(&cfg, text).expect("write config");
    let cfg = cfg.display().to_string();
    // Refused from the config alone, before the kernel module is looked for.
    expect(
        &["--config", &cfg, "attach", "r0", "/dev/nbd0"],
        1,
        "every nbd listener of r0 requires TLS (nbd-tls = \"require\"). The kernel NBD client cannot use TLS: \
         give the Primary a plaintext Unix-socket listener",
    );
}
