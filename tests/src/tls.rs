//! Certificates for TLS tests, made in the test with `blockd::certs` (rcgen): a CA
//! file, node certificates (any name, any validity, e.g. expired), and directories
//! in the layout libnbd, nbdkit and qemu read (`ca-cert.pem`, `server-*.pem`,
//! `client-*.pem`).

use std::path::{Path, PathBuf};

use blockd::certs::{Ca, Pem, Validity};

/// A CA whose files live in `dir`.
pub struct TestCa {
    pub ca: Ca,
    /// The CA certificate (what `tls-ca` names).
    pub cert: PathBuf,
    dir: PathBuf,
}

/// A certificate and key written to files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

impl TestCa {
    /// A new CA; its certificate is `DIR/LABEL-ca.pem`.
    pub fn new(dir: &Path, label: &str) -> TestCa {
        let ca = Ca::new(&format!("test {label} CA"), Validity::days_from_now(30)).expect("CA");
        let cert = dir.join(format!("{label}-ca.pem"));
        write(&cert, &ca.cert_pem());
        TestCa { ca, cert, dir: dir.to_owned() }
    }

    /// A node certificate naming `name` (and 127.0.0.1), written to
    /// `DIR/FILE-cert.pem` and `DIR/FILE-key.pem` (replacing what is there).
    pub fn node(&self, file: &str, name: &str, validity: Validity) -> CertFiles {
        let pem = self.ca.node(name, &["127.0.0.1".to_owned()], validity).expect("node certificate");
        self.write_pair(file, &pem)
    }

    /// Writes `pem` over `DIR/FILE-cert.pem` and `DIR/FILE-key.pem`.
    pub fn write_pair(&self, file: &str, pem: &Pem) -> CertFiles {
        let files = CertFiles {
            cert: self.dir.join(format!("{file}-cert.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        write(&files.cert, &pem.cert);
        write(&files.key, &pem.key);
        files
    }

    /// `[resource]` lines turning peer TLS on.
    pub fn resource_toml(&self) -> String {
        format!("tls-ca = \"{}\"\n", self.cert.display())
    }

    /// A directory `DIR/NAME/` as GnuTLS-based tools want it: `ca-cert.pem` and,
    /// when given, `server-*.pem` (a server: nbdkit) or `client-*.pem` (libnbd, qemu).
    pub fn tool_dir(&self, name: &str, server: Option<&Pem>, client: Option<&Pem>) -> PathBuf {
        let d = self.dir.join(name);
        std::fs::create_dir_all(&d).expect("tool dir");
        write(&d.join("ca-cert.pem"), &self.ca.cert_pem());
        for (role, pem) in [("server", server), ("client", client)] {
            if let Some(pem) = pem {
                write(&d.join(format!("{role}-cert.pem")), &pem.cert);
                write(&d.join(format!("{role}-key.pem")), &pem.key);
            }
        }
        d
    }
}

impl CertFiles {
    /// `[[node]]` lines for the peer link.
    pub fn node_toml(&self) -> String {
        format!("tls-cert = \"{}\"\ntls-key = \"{}\"\n", self.cert.display(), self.key.display())
    }

    /// `[[node]]` lines for NBD over TLS in `mode`.
    pub fn nbd_toml(&self, mode: &str) -> String {
        format!(
            "nbd-tls = \"{mode}\"\nnbd-tls-cert = \"{}\"\nnbd-tls-key = \"{}\"\n",
            self.cert.display(),
            self.key.display()
        )
    }
}
