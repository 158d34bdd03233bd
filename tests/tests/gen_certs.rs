//! `blockctl gen-certs` (issue 14): the files it writes (names, mode 0600, what
//! they contain), that it never overwrites, and that a pair configured with its
//! output connects over TLS and an NBD client uses its client directory.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use blockd_tests::pair::{Pair, PairOpts, binary};
use blockd_tests::*;

const FILES: [&str; 11] = [
    "ca-cert.pem",
    "ca-key.pem",
    "alpha/ca-cert.pem",
    "alpha/server-cert.pem",
    "alpha/server-key.pem",
    "beta/ca-cert.pem",
    "beta/server-cert.pem",
    "beta/server-key.pem",
    "client/ca-cert.pem",
    "client/client-cert.pem",
    "client/client-key.pem",
];

#[test]
fn gen_certs_writes_0600_files_never_overwrites_and_they_work() {
    let mut p = Pair::create("gen-certs", &PairOpts::default());
    let out = p.dir.join("tls");
    let out_s = out.display().to_string();
    let printed = p.ctl_ok(0, &["gen-certs", "r0", "--out-dir", &out_s]).stdout;
    for f in FILES {
        let meta = std::fs::metadata(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    assert!(printed.contains(&format!("tls-ca = \"{out_s}/ca-cert.pem\"")), "{printed}");
    assert!(printed.contains(&format!("tls-cert = \"{out_s}/alpha/server-cert.pem\"")), "{printed}");

    // Never overwrites: a second run refuses (exit 1), naming the files, and changes nothing.
    let before = std::fs::read(out.join("alpha/server-key.pem")).expect("key");
    p.ctl_refused(0, &["gen-certs", "r0", "--out-dir", &out_s], 1, "refusing to overwrite existing files");
    assert_eq!(std::fs::read(out.join("alpha/server-key.pem")).expect("key"), before);
    // Even when only one file of the set exists.
    let other = p.dir.join("tls2");
    std::fs::create_dir_all(other.join("beta")).expect("dir");
    std::fs::write(other.join("beta/server-key.pem"), "mine").expect("write");
    let other_s = other.display().to_string();
    p.ctl_refused(0, &["gen-certs", "r0", "--out-dir", &other_s], 1, "beta/server-key.pem");
    assert!(!other.join("ca-cert.pem").exists(), "nothing written");
    assert_eq!(std::fs::read_to_string(other.join("beta/server-key.pem")).expect("read"), "mine");

    // The printed keys, added to the config, make a TLS pair.
    let text = std::fs::read_to_string(&p.config).expect("config");
    let mut with_tls =
        text.replacen("\n\n[[node]]", &format!("\ntls-ca = \"{out_s}/ca-cert.pem\"\n\n[[node]]"), 1);
    for node in ["alpha", "beta"] {
        let control = format!("control = \"{}\"\n", p.dir.join(&format!("{node}.ctl")).display());
        let keys = format!(
            "{control}tls-cert = \"{out_s}/{node}/server-cert.pem\"\ntls-key = \"{out_s}/{node}/server-key.pem\"\n"
        );
        with_tls = with_tls.replacen(&control, &keys, 1);
    }
    std::fs::write(&p.config, with_tls).expect("config");
    p.start_node(0);
    p.start_node(1);
    p.wait_established();
    assert!(p.daemon(0).log().contains("peer link: mutual TLS 1.3"), "{}", p.daemon(0).log_tail(20));
}

#[test]
fn gen_certs_default_directory_is_beside_the_config() {
    let dir = TempDir::new("gen-certs-default");
    let d = dir.path().display();
    let config = dir.path().join("r0.toml");
    let text = format!(
        "[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:1\"\n\
         nbd = [\"unix:{d}/a.nbd\", \"192.0.2.7:10809\"]\ndisk = \"{d}/a.img\"\nmeta = \"internal\"\n"
    );
    std::fs::write(&config, text).expect("config");
    let out = run_capture(
        Command::new(binary("blockctl")).arg("--config").arg(&config).args(["gen-certs", "r0"]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", out.describe());
    let cert = dir.path().join("tls/r0/alpha/server-cert.pem");
    assert!(cert.exists(), "{}", out.describe());
    // The node's TCP nbd host is in its certificate (what NBD clients check).
    let text = tool("openssl", ["x509", "-noout", "-text", "-in", &cert.display().to_string()]).stdout;
    assert!(text.contains("DNS:alpha") && text.contains("IP Address:192.0.2.7"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication") && text.contains("TLS Web Client Authentication"),
        "{text}"
    );
}
