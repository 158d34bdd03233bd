//! NBD over TLS (`NBD_OPT_STARTTLS`, issue 14) with real clients: libnbd's nbdinfo,
//! nbdsh and nbdcopy with `nbds://…?tls-certificates=DIR`, and qemu with
//! `tls-creds-x509`. `nbd-tls = "require"` refuses plaintext TCP clients while the
//! node's Unix socket stays plaintext (the kernel client's path); `"on"` serves
//! both; `nbd-tls-ca` requires client certificates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use blockd::certs::Validity;
use blockd_tests::tls::TestCa;
use blockd_tests::*;

/// A standalone node serving over TCP (with TLS) and a Unix socket.
struct TlsNode {
    _daemon: Daemon,
    dir: TempDir,
    tcp: SocketAddr,
    unix: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem` for libnbd and qemu.
    client_dir: PathBuf,
}

fn start(label: &str, mode: &str, client_ca: bool) -> TlsNode {
    let dir = TempDir::new(label);
    let disk = dir.join("alpha.img");
    sparse_file(&disk, 64 * MIB);
    let tcp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let unix = dir.join("alpha.nbd");
    let ca = TestCa::new(dir.path(), "nbd");
    let server = ca.node("alpha", "alpha", Validity::days_from_now(30));
    let client = ca.ca.client("test NBD client", Validity::days_from_now(30)).expect("client cert");
    let client_dir = ca.tool_dir("client", None, Some(&client));
    let mut text = blockd_config(dir.path(), &disk, tcp, &unix) + &server.nbd_toml(mode);
    if client_ca {
        text.push_str(&format!("nbd-tls-ca = \"{}\"\n", ca.cert.display()));
    }
    let config = dir.join("alpha.toml");
    std::fs::write(&config, text).expect("config");
    let args = ["run", "--config", &config.display().to_string(), "--node", NODE].map(String::from).to_vec();
    let daemon = Daemon::start(
        "blockd",
        &blockd_bin(),
        args,
        dir.join("blockd.log"),
        vec![Addr::Tcp(tcp), Addr::Unix(unix.clone())],
        vec![],
    );
    TlsNode { _daemon: daemon, dir, tcp, unix, client_dir }
}

impl TlsNode {
    fn nbds(&self, dir: &std::path::Path) -> String {
        format!("nbds://{}/{EXPORT}?tls-certificates={}", self.tcp, dir.display())
    }

    fn plain_tcp(&self) -> String {
        Addr::Tcp(self.tcp).uri(EXPORT)
    }

    fn plain_unix(&self) -> String {
        Addr::Unix(self.unix.clone()).uri(EXPORT)
    }
}

fn nbdinfo(uri: &str) -> blockd_tests::tools::Output {
    run_capture(Command::new(require("nbdinfo")).arg(uri), Duration::from_secs(60))
}

#[test]
fn require_serves_libnbd_over_tls_and_refuses_plaintext_tcp() {
    let n = start("nbd-tls-req", "require", false);
    let out = nbdinfo(&n.plain_tcp());
    assert!(!out.status.success(), "plaintext TCP must be refused\n{}", out.describe());
    let info = tool("nbdinfo", [n.nbds(&n.client_dir)]).stdout;
    assert!(info.contains("with TLS") && info.contains("export-size: 67108864"), "{info}");
    // The Unix socket stays plaintext: a local (kernel) client's path.
    let info = tool("nbdinfo", [n.plain_unix()]).stdout;
    assert!(info.contains("without TLS"), "{info}");

    // nbdsh: data written over TLS reads back, and is on the disk.
    // (`nbdsh -u` refuses a URI naming local files; a script may allow it.)
    let script = format!(
        "h.set_uri_allow_local_file(True)\nh.connect_uri({:?})\nassert h.get_tls_negotiated()\n\
         buf = b'TLS!' * 1024\nh.pwrite(buf, 8192)\nh.flush()\nassert h.pread(4096, 8192) == buf\nprint('ok')",
        n.nbds(&n.client_dir)
    );
    // nbdsh itself (the shell wrapper) with Debian's python first on PATH.
    let out = run_ok(
        Command::new(require("nbdsh"))
            .env("PATH", format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()))
            .args(["-c", &script]),
        tools::TOOL_TIMEOUT,
    );
    assert_eq!(out.stdout.trim(), "ok", "{}", out.describe());
    let disk = std::fs::read(n.dir.join("alpha.img")).expect("disk");
    assert_eq!(&disk[8192..8196], b"TLS!");

    // nbdcopy both ways over TLS.
    let src = n.dir.join("src.bin");
    let back = n.dir.join("back.bin");
    random_file(&src, 8 * MIB, 14, 2 * MIB, MIB);
    tool("nbdcopy", [src.display().to_string(), n.nbds(&n.client_dir)]);
    tool("nbdcopy", ["--no-extents".to_string(), n.nbds(&n.client_dir), back.display().to_string()]);
    let back_data = std::fs::read(&back).expect("copy back");
    assert_eq!(&back_data[..8 * MIB as usize], &std::fs::read(&src).expect("src")[..], "nbdcopy round trip");
}

#[test]
fn qemu_uses_the_export_over_tls() {
    let n = start("nbd-tls-qemu", "require", false);
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", n.client_dir.display());
    let image = format!("driver=nbd,host=127.0.0.1,port={},export={EXPORT},tls-creds=tls0", n.tcp.port());
    let info = tool("qemu-img", ["info", "--object", &object, "--image-opts", &image]).stdout;
    assert!(info.contains("virtual size: 64 MiB"), "{info}");
    let out = tool(
        "qemu-io",
        [
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x5a 1M 64k",
            "-c",
            "read -P 0x5a 1M 64k",
        ],
    );
    assert!(!out.stdout.contains("Pattern verification failed"), "{}", out.stdout);
    let disk = std::fs::read(n.dir.join("alpha.img")).expect("disk");
    assert!(
        disk[MIB as usize..MIB as usize + 65536].iter().all(|&b| b == 0x5a),
        "qemu's write is on the disk"
    );
}

#[test]
fn on_serves_plaintext_and_tls_clients() {
    let n = start("nbd-tls-on", "on", false);
    assert!(tool("nbdinfo", [n.plain_tcp()]).stdout.contains("without TLS"));
    assert!(tool("nbdinfo", [n.nbds(&n.client_dir)]).stdout.contains("with TLS"));
}

#[test]
fn nbd_tls_ca_requires_a_client_certificate() {
    let n = start("nbd-tls-ca", "require", true);
    assert!(tool("nbdinfo", [n.nbds(&n.client_dir)]).stdout.contains("with TLS"));
    // The same CA, but no client certificate to present.
    let bare = n.dir.join("bare");
    std::fs::create_dir_all(&bare).expect("dir");
    std::fs::copy(n.client_dir.join("ca-cert.pem"), bare.join("ca-cert.pem")).expect("copy");
    let out = nbdinfo(&n.nbds(&bare));
    assert!(!out.status.success(), "a client without a certificate must be refused\n{}", out.describe());
}
