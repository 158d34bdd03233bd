//! `blockctl gen-certs RESOURCE`: a CA and the certificate files of every node of
//! the config, ready for the TLS keys (see `blockd::certs` for what they contain).
//!
//! Layout of the output directory (default `tls/RESOURCE/` beside the config file,
//! i.e. `/etc/blockd/tls/r0/` for `/etc/blockd/r0.toml`):
//!
//! ```text
//! ca-cert.pem            resource.tls-ca (and node nbd-tls-ca)
//! ca-key.pem             the CA's key: only needed to issue more; keep it offline
//! NODE/ca-cert.pem       NODE/ is a complete GnuTLS-style server directory
//! NODE/server-cert.pem   tls-cert and nbd-tls-cert of NODE
//! NODE/server-key.pem    tls-key and nbd-tls-key of NODE
//! client/ca-cert.pem     for NBD clients: libnbd `tls-certificates=DIR`,
//! client/client-cert.pem qemu `tls-creds-x509,endpoint=client,dir=DIR`
//! client/client-key.pem
//! ```
//!
//! The names are those libnbd, nbdkit and qemu look for in a certificates
//! directory. Every file is created with mode 0600 and never overwritten: if any of
//! them exists, nothing is written.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use blockd::certs::{Ca, Validity};
use blockd::config::{Config, ListenAddr};

use crate::{Fail, refused};

/// `gen-certs` options.
pub struct GenCerts {
    pub out_dir: Option<PathBuf>,
    pub days: u32,
    /// Extra names or addresses for every node certificate (NBD clients' host names).
    pub sans: Vec<String>,
}

/// The default directory: `tls/RESOURCE` beside the config file.
fn default_dir(config: &Config) -> PathBuf {
    let dir = config.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    dir.join("tls").join(&config.resource.name)
}

/// The hosts NBD clients may use to reach `node`: its TCP `nbd` hosts except
/// wildcards, then `extra`.
fn nbd_hosts(config: &Config, node: &str, extra: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = config
        .node(node)
        .into_iter()
        .flat_map(|n| n.nbd.iter())
        .filter_map(|a| match a {
            ListenAddr::Tcp(hp) if !hp.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) => {
                Some(hp.host.clone())
            }
            _ => None,
        })
        .chain(extra.iter().cloned())
        .collect();
    hosts.dedup();
    hosts
}

pub fn gen_certs(config: &Config, opts: GenCerts) -> Result<(), Fail> {
    let out = opts.out_dir.unwrap_or_else(|| default_dir(config));
    let out = std::path::absolute(&out).map_err(|e| refused(format!("{}: {e}", out.display())))?;
    let res = &config.resource.name;
    let validity = Validity::days_from_now(opts.days);
    let fail = |e: rcgen::Error| refused(format!("cannot make a certificate: {e}"));
    let ca = Ca::new(&format!("blockd {res} CA"), validity).map_err(fail)?;
    let ca_cert = ca.cert_pem();
    let mut files: Vec<(PathBuf, String)> =
        vec![(out.join("ca-cert.pem"), ca_cert.clone()), (out.join("ca-key.pem"), ca.key_pem())];
    for node in &config.nodes {
        let pem = ca.node(&node.name, &nbd_hosts(config, &node.name, &opts.sans), validity).map_err(fail)?;
        let dir = out.join(&node.name);
        files.push((dir.join("ca-cert.pem"), ca_cert.clone()));
        files.push((dir.join("server-cert.pem"), pem.cert));
        files.push((dir.join("server-key.pem"), pem.key));
    }
    let client = ca.client(&format!("blockd {res} NBD client"), validity).map_err(fail)?;
    let client_dir = out.join("client");
    files.push((client_dir.join("ca-cert.pem"), ca_cert));
    files.push((client_dir.join("client-cert.pem"), client.cert));
    files.push((client_dir.join("client-key.pem"), client.key));

    let existing: Vec<String> = files
        .iter()
        .filter(|(p, _)| p.symlink_metadata().is_ok())
        .map(|(p, _)| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        return Err(refused(format!(
            "refusing to overwrite existing files: {}; remove them or choose another --out-dir",
            existing.join(", ")
        )));
    }
    for (path, text) in &files {
        let dir = path.parent().expect("files are inside the output directory");
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| refused(format!("cannot create {}: {e}", dir.display())))?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| refused(format!("cannot create {}: {e}", path.display())))?;
        f.write_all(text.as_bytes()).map_err(|e| refused(format!("cannot write {}: {e}", path.display())))?;
    }
    print!("{}", summary(config, &out));
    Ok(())
}

/// What was written and the config keys that use it.
fn summary(config: &Config, out: &Path) -> String {
    let d = out.display();
    let mut s = format!(
        "wrote {d}/: ca-cert.pem, ca-key.pem (the CA's key: keep it offline), one directory per node ({}) \
         and client/\n\nFor TLS on the peer link, in the config every node shares:\n\n[resource]\ntls-ca = \
         \"{d}/ca-cert.pem\"\n",
        config.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    for n in &config.nodes {
        s.push_str(&format!(
            "\n[[node]]   # name = \"{}\"\ntls-cert = \"{d}/{0}/server-cert.pem\"\ntls-key = \"{d}/{0}/server-key.pem\"\n",
            n.name
        ));
    }
    s.push_str(&format!(
        "\nEach node needs its own directory (and ca-cert.pem) at these paths on its host.\nFor NBD over \
         TLS, a node also takes nbd-tls = \"require\" (or \"on\") with nbd-tls-cert / nbd-tls-key = the \
         same two files, and\noptionally nbd-tls-ca = \"{d}/ca-cert.pem\" to require client certificates. \
         NBD clients use {d}/client:\n  nbdinfo 'nbds://HOST:PORT/{r}?tls-certificates={d}/client'\n  \
         qemu-img info --object tls-creds-x509,id=tls0,endpoint=client,dir={d}/client --image-opts \
         driver=nbd,host=HOST,port=PORT,export={r},tls-creds=tls0\n",
        r = config.resource.name
    ));
    s
}
