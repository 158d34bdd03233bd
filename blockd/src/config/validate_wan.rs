//! Validation of the WAN keys (see [`super::super::wan`]): `compression`,
//! `compression-level`, `replication-rate`, `on-congestion`, `congestion-fill`.

use super::Cx;
use super::describe;
use crate::config::raw::RawResource;
use crate::config::values::parse_size;
use crate::config::wan::{
    Compression, CongestionPolicy, DEFAULT_COMPRESSION_LEVEL, DEFAULT_CONGESTION_FILL_BYTES,
    MAX_COMPRESSION_LEVEL, MIN_COMPRESSION_LEVEL, MIN_CONGESTION_FILL_BYTES,
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
            Some(n) => self.int_in(
                n,
                "resource.compression-level",
                MIN_COMPRESSION_LEVEL..=MAX_COMPRESSION_LEVEL,
                &format!(
                    "a zstd level from {MIN_COMPRESSION_LEVEL} (fastest) to {MAX_COMPRESSION_LEVEL} \
                     (smallest); default {DEFAULT_COMPRESSION_LEVEL}"
                ),
            )?,
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

    /// `on-congestion` (protocol A only) and `congestion-fill` (1 MiB up to the
    /// send buffer).
    pub(super) fn congestion(
        &self,
        raw: &RawResource,
        protocol: Protocol,
        send_buffer_bytes: u64,
    ) -> Result<(CongestionPolicy, u64), ConfigError> {
        let on_congestion = match &raw.on_congestion {
            None => CongestionPolicy::default(),
            Some(p) => match p.get_ref().0.as_str() {
                "block" => CongestionPolicy::Block,
                "pull-ahead" if protocol != Protocol::A => {
                    let why = format!(
                        r#""pull-ahead" needs protocol "A" (this resource uses "{protocol}"): under B and C every write waits for the peer"#
                    );
                    return Err(self.at(p, "resource.on-congestion", why));
                }
                "pull-ahead" => CongestionPolicy::PullAhead,
                other => {
                    let why = format!(r#"expected "block" or "pull-ahead", found {other:?}"#);
                    return Err(self.at(p, "resource.on-congestion", why));
                }
            },
        };
        let congestion_fill_bytes = match &raw.congestion_fill {
            None => DEFAULT_CONGESTION_FILL_BYTES.min(send_buffer_bytes),
            Some(b) => {
                let key = "resource.congestion-fill";
                let bytes = parse_size(b.get_ref()).map_err(|m| self.at(b, key, m))?;
                if !(MIN_CONGESTION_FILL_BYTES..=send_buffer_bytes).contains(&bytes) {
                    let why = format!(
                        "{} is not allowed; use 1MiB up to send-buffer ({send_buffer_bytes} bytes): \
                         beyond it writers would wait before the policy acts",
                        describe(b.get_ref())
                    );
                    return Err(self.at(b, key, why));
                }
                bytes
            }
        };
        Ok((on_congestion, congestion_fill_bytes))
    }
}
