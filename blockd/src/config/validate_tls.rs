//! Validation of the TLS keys (see [`super::super::tls`]): paths, which keys need
//! which, and node names that can be certificate names.

use std::path::PathBuf;

use toml::Spanned;

use super::Cx;
use crate::config::ConfigError;
use crate::config::raw::{RawNode, RawResource};
use crate::config::tls::{NbdTls, NbdTlsMode, TlsFiles};
use crate::config::values::check_abs_path;

impl Cx<'_> {
    /// An optional absolute path.
    fn opt_path(&self, v: &Option<Spanned<String>>, key: &str) -> Result<Option<PathBuf>, ConfigError> {
        match v {
            None => Ok(None),
            Some(p) => {
                check_abs_path(p.get_ref()).map_err(|m| self.at(p, key, m))?;
                Ok(Some(PathBuf::from(p.get_ref())))
            }
        }
    }

    /// `resource.tls-ca`.
    pub(super) fn tls_ca(&self, raw: &RawResource) -> Result<Option<PathBuf>, ConfigError> {
        self.opt_path(&raw.tls_ca, "resource.tls-ca")
    }

    /// A node's `tls-cert` / `tls-key`: both required with `tls-ca`, refused without.
    pub(super) fn node_tls(
        &self,
        key: &str,
        table: &Spanned<RawNode>,
        name: &Spanned<String>,
        tls_on: bool,
    ) -> Result<Option<TlsFiles>, ConfigError> {
        let raw = table.get_ref();
        let k = |field: &str| format!("{key}.{field}");
        if !tls_on {
            for (v, field) in [(&raw.tls_cert, "tls-cert"), (&raw.tls_key, "tls-key")] {
                if let Some(v) = v {
                    let why = "has no effect without resource.tls-ca; set resource.tls-ca to turn on TLS for \
                               the peer link";
                    return Err(self.at(v, &k(field), why.into()));
                }
            }
            return Ok(None);
        }
        // The peer's certificate must name it as a DNS-name subjectAltName.
        if rustls::pki_types::DnsName::try_from(name.get_ref().as_str()).is_err() {
            let why = format!(
                "{:?} is not a valid DNS name, and with resource.tls-ca set a node's certificate must \
                 name it as a DNS subjectAltName; rename the node",
                name.get_ref()
            );
            return Err(self.at(name, &k("name"), why));
        }
        let mut files = Vec::with_capacity(2);
        for (v, field) in [(&raw.tls_cert, "tls-cert"), (&raw.tls_key, "tls-key")] {
            let Some(path) = self.opt_path(v, &k(field))? else {
                let why = "missing required key: resource.tls-ca is set, so every node needs tls-cert and \
                           tls-key (e.g. from `blockctl gen-certs`)";
                return Err(self.at(table, &k(field), why.into()));
            };
            files.push(path);
        }
        let key_path = files.pop().expect("two paths");
        Ok(Some(TlsFiles { cert: files.pop().expect("two paths"), key: key_path }))
    }

    /// A node's `nbd-tls`, `nbd-tls-cert`, `nbd-tls-key`, `nbd-tls-ca`.
    pub(super) fn nbd_tls(&self, key: &str, table: &Spanned<RawNode>) -> Result<NbdTls, ConfigError> {
        let raw = table.get_ref();
        let k = |field: &str| format!("{key}.{field}");
        let mode = match &raw.nbd_tls {
            None => NbdTlsMode::Off,
            Some(m) => match m.get_ref().0.as_str() {
                "off" => NbdTlsMode::Off,
                "on" => NbdTlsMode::On,
                "require" => NbdTlsMode::Require,
                other => {
                    let why = format!(r#"expected "off", "on" or "require", found {other:?}"#);
                    return Err(self.at(m, &k("nbd-tls"), why));
                }
            },
        };
        let cert = self.opt_path(&raw.nbd_tls_cert, &k("nbd-tls-cert"))?;
        let key_path = self.opt_path(&raw.nbd_tls_key, &k("nbd-tls-key"))?;
        let client_ca = self.opt_path(&raw.nbd_tls_ca, &k("nbd-tls-ca"))?;
        if mode == NbdTlsMode::Off {
            let set = [
                (&raw.nbd_tls_cert, "nbd-tls-cert"),
                (&raw.nbd_tls_key, "nbd-tls-key"),
                (&raw.nbd_tls_ca, "nbd-tls-ca"),
            ];
            if let Some((Some(v), field)) = set.into_iter().find(|(v, _)| v.is_some()) {
                let why = r#"has no effect while nbd-tls is "off"; set nbd-tls = "on" or "require""#;
                return Err(self.at(v, &k(field), why.into()));
            }
            return Ok(NbdTls::default());
        }
        let need = |p: Option<PathBuf>, field: &str| {
            p.ok_or_else(|| {
                let why = format!(
                    r#"missing required key: nbd-tls is "{mode}", which needs nbd-tls-cert and nbd-tls-key"#
                );
                self.at(table, &k(field), why)
            })
        };
        let files = TlsFiles { cert: need(cert, "nbd-tls-cert")?, key: need(key_path, "nbd-tls-key")? };
        Ok(NbdTls { mode, files: Some(files), client_ca })
    }
}
