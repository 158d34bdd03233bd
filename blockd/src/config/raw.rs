//! The file as written: serde structs that mirror the TOML keys one to one, every value
//! wrapped in [`Spanned`] so that validation can point at its line.
//!
//! Required keys are `Option`s here on purpose: a missing key is reported by validation
//! with the line of its table header, rather than by serde.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", expecting = "a table")]
pub(super) struct RawConfig {
    pub resource: Option<Spanned<RawResource>>,
    pub node: Option<Spanned<Vec<Spanned<RawNode>>>>,
}

/// `[resource]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", expecting = "a [resource] table")]
pub(super) struct RawResource {
    pub name: Option<Spanned<String>>,
    pub protocol: Option<Spanned<RawProtocol>>,
    pub size: Option<Spanned<RawSize>>,
    pub bitmap_granularity: Option<Spanned<RawSize>>,
    pub send_buffer: Option<Spanned<RawSize>>,
    pub al_extents: Option<Spanned<RawInt>>,
    pub resync_rate: Option<Spanned<RawRate>>,
    pub resync_min_rate: Option<Spanned<RawRate>>,
    pub resync_checksum: Option<Spanned<bool>>,
    pub shared_secret: Option<Spanned<String>>,
    pub allow_unauthenticated_peers: Option<Spanned<bool>>,
    pub tls_ca: Option<Spanned<String>>,
    pub on_io_error: Option<Spanned<RawIoErrorPolicy>>,
    pub ack_timeout: Option<Spanned<RawDuration>>,
    pub on_congestion: Option<Spanned<RawCongestionPolicy>>,
    pub congestion_fill: Option<Spanned<RawSize>>,
    pub undo_size: Option<Spanned<RawSize>>,
    pub compression: Option<Spanned<RawCompression>>,
    pub compression_level: Option<Spanned<RawInt>>,
    pub replication_rate: Option<Spanned<RawRate>>,
}

/// One `[[node]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", expecting = "a [[node]] table")]
pub(super) struct RawNode {
    pub name: Option<Spanned<String>>,
    pub replication: Option<Spanned<String>>,
    pub nbd: Option<Spanned<RawNbd>>,
    pub disk: Option<Spanned<String>>,
    pub meta: Option<Spanned<RawMeta>>,
    pub control: Option<Spanned<String>>,
    pub control_group: Option<Spanned<String>>,
    pub metrics: Option<Spanned<String>>,
    pub fence_peer: Option<Spanned<String>>,
    pub after_resync_target: Option<Spanned<String>>,
    pub mlock: Option<Spanned<bool>>,
    pub oom_score_adj: Option<Spanned<RawInt>>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub nbd_tls: Option<Spanned<RawNbdTls>>,
    pub nbd_tls_cert: Option<Spanned<String>>,
    pub nbd_tls_key: Option<Spanned<String>>,
    pub nbd_tls_ca: Option<Spanned<String>>,
    pub undo_dir: Option<Spanned<String>>,
    pub worker_threads: Option<Spanned<RawInt>>,
}

/// Declares a string newtype whose type errors name what the string should be.
macro_rules! described_string {
    ($(#[$doc:meta])* $name:ident, $expecting:literal) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub(super) struct $name(pub String);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $name;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$name, E> {
                        Ok($name(v.to_owned()))
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

described_string!(
    /// `protocol`; checked by validation.
    RawProtocol,
    r#""A", "B" or "C""#
);
described_string!(
    /// `nbd-tls`; checked by validation.
    RawNbdTls,
    r#""off", "on" or "require""#
);
described_string!(
    /// `on-io-error`; checked by validation.
    RawIoErrorPolicy,
    r#""detach" or "pass-on""#
);
described_string!(
    /// `on-congestion`; checked by validation.
    RawCongestionPolicy,
    r#""block" or "pull-ahead""#
);
described_string!(
    /// `compression`; checked by validation.
    RawCompression,
    r#""off" or "zstd""#
);
described_string!(
    /// `meta`; checked by validation.
    RawMeta,
    r#""internal" or a path"#
);

/// A size as written: a TOML integer, a TOML float (always rejected, but with a
/// helpful message) or a string with an optional unit.
#[derive(Debug, Clone)]
pub(super) enum RawSize {
    Int(i64),
    Float(f64),
    Str(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SizeVisitor(r#"a size (a number of bytes, or a string such as "4KiB")"#))
    }
}

/// A rate as written: a size (bytes per second, a string may end in `/s`) or, where
/// the key allows it, `"auto"`; told apart by validation.
#[derive(Debug, Clone)]
pub(super) struct RawRate(pub RawSize);

impl<'de> Deserialize<'de> for RawRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let expecting = r#"a rate (bytes per second, or a string such as "100MiB")"#;
        d.deserialize_any(SizeVisitor(expecting)).map(RawRate)
    }
}

impl RawRate {
    /// The keyword `"auto"` (exact spelling, surrounding blanks allowed).
    pub fn is_auto(&self) -> bool {
        matches!(&self.0, RawSize::Str(s) if s.trim() == "auto")
    }
}

/// Reads a [`RawSize`]; the string is what type errors say was expected.
struct SizeVisitor(&'static str);

impl Visitor<'_> for SizeVisitor {
    type Value = RawSize;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
        Ok(RawSize::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
        // TOML integers are i64, so this only happens for other inputs; the
        // string form is range-checked like any other size string.
        Ok(i64::try_from(v).map_or_else(|_| RawSize::Str(v.to_string()), RawSize::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawSize, E> {
        Ok(RawSize::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
        Ok(RawSize::Str(v.to_owned()))
    }
}

/// A duration: a string with a unit (`"10s"`, `"500ms"`) or an integer of seconds;
/// parsed by validation.
#[derive(Debug, Clone)]
pub(super) struct RawDuration(pub String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration (a string such as "10s", or seconds)"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                Ok(RawDuration(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A plain TOML integer (a count, not a size: no units), range-checked by validation.
#[derive(Debug, Clone, Copy)]
pub(super) struct RawInt(pub i64);

impl<'de> Deserialize<'de> for RawInt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawInt;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawInt, E> {
                Ok(RawInt(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawInt, E> {
                // Only non-TOML inputs get here; anything past i64 is out of range anyway.
                Ok(RawInt(i64::try_from(v).unwrap_or(i64::MAX)))
            }
        }
        d.deserialize_any(V)
    }
}

/// `nbd`: one address string, or an array of them (each with its own span).
#[derive(Debug)]
pub(super) enum RawNbd {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for RawNbd {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawNbd;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"an address ("host:port" or "unix:/path") or an array of them"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawNbd, E> {
                Ok(RawNbd::One(v.to_owned()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawNbd, A::Error> {
                let mut out = Vec::new();
                while let Some(addr) = seq.next_element::<Spanned<String>>()? {
                    out.push(addr);
                }
                Ok(RawNbd::Many(out))
            }
        }
        d.deserialize_any(V)
    }
}
