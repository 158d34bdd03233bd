//! Validation of the WAN keys (see [`super::super::wan`]): `compression`,
//! `compression-level`, `replication-rate`.

use super::Cx;
use crate::config::raw::RawResource;
use crate::config::wan::{
    Compression, DEFAULT_COMPRESSION_LEVEL, MAX_COMPRESSION_LEVEL, MIN_COMPRESSION_LEVEL,
    MIN_REPLICATION_RATE_BYTES_PER_SEC,
};
use crate::config::{ConfigError, Protocol};

impl Cx<'_> {
    /// `compression` and `compression-level`.
    pub(super) fn compression(&self, raw: &RawResource) -> Result<(Compression, i32), ConfigError> {
        let compression = match &raw.compression {
            None => Compression::default(),
            Some(c) => match c.get_ref().0.as_str() {
                "off" => Compression::Off,
                "zstd" => Compression::Zstd,
                other => {
                    let why = format!(r#"expected "off" or "zstd", found {other:?}"#);
                    return Err(self.at(c, "resource.compression", why));
                }
            },
        };
        let level = match &raw.compression_level {
            None => DEFAULT_COMPRESSION_LEVEL,
            Some(n) => match i32::try_from(n.get_ref().0) {
                Ok(v) if (MIN_COMPRESSION_LEVEL..=MAX_COMPRESSION_LEVEL).contains(&v) => v,
                _ => {
                    let why = format!(
                        "{} is not allowed; use a zstd level from {MIN_COMPRESSION_LEVEL} (fastest) to \
                         {MAX_COMPRESSION_LEVEL} (smallest); default {DEFAULT_COMPRESSION_LEVEL}",
                        n.get_ref().0
                    );
                    return Err(self.at(n, "resource.compression-level", why));
                }
            },
        };
        Ok((compression, level))
    }

    /// `replication-rate`: `None` is unlimited. Only protocols A and B can be paced.
    pub(super) fn replication_rate(
        &self,
        raw: &RawResource,
        protocol: Protocol,
    ) -> Result<Option<u64>, ConfigError> {
        let Some(r) = &raw.replication_rate else { return Ok(None) };
        let key = "resource.replication-rate";
        if r.get_ref().is_auto() {
            let why = r#""auto" is not allowed here; give a rate such as "100MiB", or leave the key out for no limit"#;
            return Err(self.at(r, key, why.to_owned()));
        }
        let bytes = self.rate(r, key, false, MIN_REPLICATION_RATE_BYTES_PER_SEC, "64KiB")?;
        if protocol == Protocol::C {
            let why =
                "replication-rate needs protocol A or B: under protocol C every write waits for the peer";
            return Err(self.at(r, key, why.to_owned()));
        }
        Ok(Some(bytes))
    }
}
