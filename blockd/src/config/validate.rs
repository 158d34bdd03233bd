//! From text to [`Config`]: TOML syntax and serde errors are turned into located
//! [`ConfigError`]s, then the raw structs are checked and converted.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_path_to_error::Segment;
use toml::Spanned;

use super::disk::parse_duration_ms;
use super::raw::{RawConfig, RawInt, RawNbd, RawNode, RawRate, RawResource, RawSize};
use super::undo::check_undo_size;
use super::values::{
    UNIX_PATH_MAX, check_abs_path, check_name, check_unix_path, parse_host_port, parse_listen_addr,
    parse_size,
};
use super::{
    Config, ConfigError, DEFAULT_AL_EXTENTS, DEFAULT_BITMAP_GRANULARITY, DEFAULT_CONTROL_DIR,
    DEFAULT_OOM_SCORE_ADJ, DEFAULT_RESYNC_MIN_RATE_BYTES_PER_SEC, DEFAULT_SEND_BUFFER_BYTES, Handlers,
    HostPort, ListenAddr, MAX_AL_EXTENTS_CONFIG, MAX_BITMAP_GRANULARITY, MAX_SEND_BUFFER_BYTES,
    MAX_WORKER_THREADS, MIN_AL_EXTENTS, MIN_BITMAP_GRANULARITY, MIN_RESYNC_RATE_BYTES_PER_SEC,
    MIN_SEND_BUFFER_BYTES, MIN_SHARED_SECRET_BYTES, MetaLocation, NodeConfig, NodeLines, Protocol,
    ResourceConfig, ResyncRate, SharedSecret,
};
use super::{DEFAULT_ACK_TIMEOUT_MS, IoErrorPolicy, MAX_ACK_TIMEOUT_MS, MIN_ACK_TIMEOUT_MS};
use super::{DEFAULT_UNDO_DIR, DEFAULT_UNDO_SIZE_BYTES};

#[path = "validate_tls.rs"]
mod tls;
#[path = "validate_wan.rs"]
mod wan;

/// Sizes must be whole sectors.
const SECTOR: u64 = 512;

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let cx = Cx { text, path };
    let de = toml::Deserializer::parse(text).map_err(|e| cx.syntax(&e))?;
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| cx.serde(&e))?;
    cx.convert(raw)
}

/// What every error needs: the text (for line numbers) and the file name.
struct Cx<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Cx<'_> {
    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    fn invalid(&self, span: Option<Range<usize>>, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: span.map(|s| self.line(s.start)),
            key: key.to_owned(),
            message,
        }
    }

    fn at<T>(&self, value: &Spanned<T>, key: &str, message: String) -> ConfigError {
        self.invalid(Some(value.span()), key, message)
    }

    /// An integer key's value when `T` holds it and it is in `range`; otherwise
    /// "N is not allowed; use `allowed`" at the value.
    pub(super) fn int_in<T>(
        &self,
        n: &Spanned<RawInt>,
        key: &str,
        range: std::ops::RangeInclusive<T>,
        allowed: &str,
    ) -> Result<T, ConfigError>
    where
        T: TryFrom<i64> + PartialOrd,
    {
        let v = n.get_ref().0;
        match T::try_from(v) {
            Ok(t) if range.contains(&t) => Ok(t),
            _ => Err(self.at(n, key, format!("{v} is not allowed; use {allowed}"))),
        }
    }

    /// A required key is absent: point at the header of its table.
    fn missing<T>(&self, table: &Spanned<T>, key: &str) -> ConfigError {
        self.at(table, key, "missing required key".into())
    }

    fn required<'v, T, U>(
        &self,
        value: &'v Option<Spanned<T>>,
        table: &Spanned<U>,
        key: &str,
    ) -> Result<&'v Spanned<T>, ConfigError> {
        value.as_ref().ok_or_else(|| self.missing(table, key))
    }

    fn syntax(&self, e: &toml::de::Error) -> ConfigError {
        let mut message = format!("invalid TOML: {}", one_line(e.message()));
        // toml says only "duplicate key"; the span holds the key as written.
        if let Some(key) = e.span().and_then(|s| self.text.get(s))
            && e.message() == "duplicate key"
            && !key.contains('\n')
        {
            message.push_str(&format!(" `{}`", key.trim()));
        }
        ConfigError::Syntax {
            path: self.path.to_owned(),
            line: e.span().map(|s| self.line(s.start)),
            message,
        }
    }

    /// Unknown keys and wrong types, with the key path serde_path_to_error tracked.
    fn serde(&self, e: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key = key_path(e.path());
        let inner = e.inner();
        let message = one_line(inner.message());
        let message = if let Some(rest) = message.strip_prefix("unknown field `") {
            // serde: "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`"
            // / "there are no fields".
            let expected: Vec<&str> = rest
                .split_once(", expected ")
                .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
                .unwrap_or_default();
            if expected.is_empty() {
                "unknown key".to_owned()
            } else {
                format!("unknown key (expected one of: {})", expected.join(", "))
            }
        } else if let Some(rest) = message.strip_prefix("invalid type: ") {
            match rest.split_once(", expected ") {
                Some((found, expected)) => {
                    let (expected, found_words) = (toml_words(expected), toml_words(found));
                    let mut m = format!("expected {expected}, found {found_words}");
                    if key == "node" && found == "map" {
                        m.push_str("; write [[node]] (double brackets) for each node");
                    }
                    m
                }
                None => message,
            }
        } else {
            message
        };
        if key.is_empty() {
            ConfigError::Syntax {
                path: self.path.to_owned(),
                line: inner.span().map(|s| self.line(s.start)),
                message,
            }
        } else {
            self.invalid(inner.span(), &key, message)
        }
    }

    fn convert(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let Some(resource) = raw.resource else {
            return Err(self.invalid(
                None,
                "resource",
                "missing required table; add a [resource] table with a name".into(),
            ));
        };
        let resource = self.resource(&resource)?;
        let Some(nodes) = raw.node else {
            return Err(self.invalid(
                None,
                "node",
                "missing required table; add a [[node]] table for each node".into(),
            ));
        };
        if nodes.get_ref().is_empty() {
            return Err(self.at(&nodes, "node", "at least one node is required".into()));
        }
        let mut names = HashMap::new();
        let mut endpoints = Endpoints::default();
        let mut out = Vec::with_capacity(nodes.get_ref().len());
        for (i, node) in nodes.get_ref().iter().enumerate() {
            let key = format!("node[{i}]");
            let tls_on = resource.tls_ca.is_some();
            out.push(self.node(&key, node, &resource.name, tls_on, &mut names, &mut endpoints)?);
        }
        // SPEC §6: peers authenticate in production. A pair on loopback (tests, a
        // demo on one machine) may go without; anything that crosses a network needs
        // TLS, the secret, or an explicit opt-out.
        let authenticated = resource.tls_ca.is_some() || resource.shared_secret.is_some();
        if out.len() > 1 && !authenticated && !resource.allow_unauthenticated_peers {
            let nodes = nodes.get_ref();
            if let Some((i, n)) = out.iter().enumerate().find(|(_, n)| !is_loopback(&n.replication.host)) {
                let why = format!(
                    "{} is not a loopback address, so peers must authenticate: set resource.tls-ca (mutual \
                     TLS, with tls-cert and tls-key on every node) or resource.shared-secret (the same on \
                     every node), or resource.allow-unauthenticated-peers = true",
                    n.replication
                );
                let key = format!("node[{i}].replication");
                return Err(match &nodes[i].get_ref().replication {
                    Some(r) => self.at(r, &key, why),
                    None => self.at(&nodes[i], &key, why),
                });
            }
        }
        Ok(Config { path: self.path.to_owned(), resource, nodes: out })
    }

    fn resource(&self, table: &Spanned<RawResource>) -> Result<ResourceConfig, ConfigError> {
        let raw = table.get_ref();
        let name = raw.name.as_ref().ok_or_else(|| self.missing(table, "resource.name"))?;
        check_name(name.get_ref()).map_err(|m| self.at(name, "resource.name", m))?;

        let protocol = match &raw.protocol {
            None => Protocol::default(),
            Some(p) => match p.get_ref().0.as_str() {
                "A" => Protocol::A,
                "B" => Protocol::B,
                "C" => Protocol::C,
                other => {
                    return Err(self.at(
                        p,
                        "resource.protocol",
                        format!(r#"expected "A", "B" or "C", found {other:?}"#),
                    ));
                }
            },
        };

        let size_bytes = match &raw.size {
            None => None,
            Some(size) => {
                let key = "resource.size";
                let bytes = parse_size(size.get_ref()).map_err(|m| self.at(size, key, m))?;
                if bytes == 0 {
                    return Err(self.at(size, key, "the size must not be zero".into()));
                }
                if bytes % SECTOR != 0 {
                    let shown = match size.get_ref() {
                        RawSize::Str(s) => format!("{s:?} ({bytes} bytes)"),
                        _ => format!("{bytes} bytes"),
                    };
                    return Err(self.at(size, key, format!("{shown} is not a multiple of {SECTOR} bytes")));
                }
                Some(bytes)
            }
        };

        let bitmap_granularity_bytes = match &raw.bitmap_granularity {
            None => DEFAULT_BITMAP_GRANULARITY,
            Some(g) => {
                let key = "resource.bitmap-granularity";
                let bytes = parse_size(g.get_ref()).map_err(|m| self.at(g, key, m))?;
                if !bytes.is_power_of_two()
                    || !(MIN_BITMAP_GRANULARITY..=MAX_BITMAP_GRANULARITY).contains(&bytes)
                {
                    return Err(self.at(
                        g,
                        key,
                        format!(
                            "{} is not allowed; use a power of two from 4KiB to 1MiB",
                            describe(g.get_ref())
                        ),
                    ));
                }
                bytes
            }
        };

        let send_buffer_bytes = match &raw.send_buffer {
            None => DEFAULT_SEND_BUFFER_BYTES,
            Some(b) => {
                let key = "resource.send-buffer";
                let bytes = parse_size(b.get_ref()).map_err(|m| self.at(b, key, m))?;
                if !(MIN_SEND_BUFFER_BYTES..=MAX_SEND_BUFFER_BYTES).contains(&bytes) {
                    let why = format!("{} is not allowed; use 64KiB to 4GiB", describe(b.get_ref()));
                    return Err(self.at(b, key, why));
                }
                bytes
            }
        };

        let al_extents = match &raw.al_extents {
            None => DEFAULT_AL_EXTENTS,
            Some(n) => self.int_in(
                n,
                "resource.al-extents",
                MIN_AL_EXTENTS..=MAX_AL_EXTENTS_CONFIG,
                &format!("{MIN_AL_EXTENTS} to {MAX_AL_EXTENTS_CONFIG} (extents of 4MiB)"),
            )?,
        };

        let resync_rate = match &raw.resync_rate {
            None => ResyncRate::Auto,
            Some(r) if r.get_ref().is_auto() => ResyncRate::Auto,
            Some(r) => ResyncRate::Fixed {
                bytes_per_sec: self.rate(
                    r,
                    "resource.resync-rate",
                    true,
                    MIN_RESYNC_RATE_BYTES_PER_SEC,
                    "1MiB",
                )?,
            },
        };
        let resync_min_rate_bytes_per_sec = match &raw.resync_min_rate {
            None => DEFAULT_RESYNC_MIN_RATE_BYTES_PER_SEC,
            Some(r) if r.get_ref().is_auto() => {
                let why = r#""auto" is not allowed here; give a rate such as "8MiB""#.to_owned();
                return Err(self.at(r, "resource.resync-min-rate", why));
            }
            Some(r) => {
                self.rate(r, "resource.resync-min-rate", false, MIN_RESYNC_RATE_BYTES_PER_SEC, "1MiB")?
            }
        };
        let resync_checksum = raw.resync_checksum.as_ref().is_some_and(|b| *b.get_ref());
        let shared_secret = match &raw.shared_secret {
            None => None,
            Some(s) if s.get_ref().len() < MIN_SHARED_SECRET_BYTES => {
                let why = format!(
                    "{} bytes is too short; use at least {MIN_SHARED_SECRET_BYTES} (e.g. the output of \
                     `openssl rand -base64 32`)",
                    s.get_ref().len()
                );
                return Err(self.at(s, "resource.shared-secret", why));
            }
            Some(s) => Some(SharedSecret::new(s.get_ref().clone())),
        };
        let allow_unauthenticated_peers =
            raw.allow_unauthenticated_peers.as_ref().is_some_and(|b| *b.get_ref());
        let tls_ca = self.tls_ca(raw)?;
        let on_io_error = match &raw.on_io_error {
            None => IoErrorPolicy::default(),
            Some(p) => match p.get_ref().0.as_str() {
                "detach" => IoErrorPolicy::Detach,
                "pass-on" => IoErrorPolicy::PassOn,
                other => {
                    let why = format!(r#"expected "detach" or "pass-on", found {other:?}"#);
                    return Err(self.at(p, "resource.on-io-error", why));
                }
            },
        };
        let ack_timeout_ms = match &raw.ack_timeout {
            None => DEFAULT_ACK_TIMEOUT_MS,
            Some(d) => {
                let key = "resource.ack-timeout";
                let ms = parse_duration_ms(&d.get_ref().0).map_err(|m| self.at(d, key, m))?;
                if !(MIN_ACK_TIMEOUT_MS..=MAX_ACK_TIMEOUT_MS).contains(&ms) {
                    let why = format!("{:?} is not allowed; use 2s to 1h", d.get_ref().0);
                    return Err(self.at(d, key, why));
                }
                ms
            }
        };
        let undo_size_bytes = match &raw.undo_size {
            None => DEFAULT_UNDO_SIZE_BYTES,
            Some(u) => {
                let key = "resource.undo-size";
                let bytes = parse_size(u.get_ref()).map_err(|m| self.at(u, key, m))?;
                check_undo_size(bytes, &describe(u.get_ref())).map_err(|m| self.at(u, key, m))?
            }
        };

        let (on_congestion, congestion_fill_bytes) = self.congestion(raw, protocol, send_buffer_bytes)?;
        let (compression, compression_level) = self.compression(raw)?;
        let replication_rate_bytes_per_sec = self.replication_rate(raw, protocol)?;

        Ok(ResourceConfig {
            name: name.get_ref().clone(),
            protocol,
            size_bytes,
            bitmap_granularity_bytes,
            send_buffer_bytes,
            al_extents,
            resync_rate,
            resync_min_rate_bytes_per_sec,
            resync_checksum,
            shared_secret,
            allow_unauthenticated_peers,
            tls_ca,
            on_io_error,
            ack_timeout_ms,
            on_congestion,
            congestion_fill_bytes,
            undo_size_bytes,
            compression,
            compression_level,
            replication_rate_bytes_per_sec,
        })
    }

    /// A rate in bytes per second (a string may end in `/s`), at least `min` bytes
    /// (written `min_text` in messages). `auto_ok`: the key also takes `"auto"`
    /// (handled by the caller), which the messages then mention.
    fn rate(
        &self,
        raw: &Spanned<RawRate>,
        key: &str,
        auto_ok: bool,
        min: u64,
        min_text: &str,
    ) -> Result<u64, ConfigError> {
        let written = &raw.get_ref().0;
        let hint = if auto_ok { r#""auto" or "# } else { "" };
        let size = match written {
            // "100MiB/s" reads naturally for a rate; the unit is per second anyway.
            RawSize::Str(s) => RawSize::Str(s.trim_end().strip_suffix("/s").unwrap_or(s).to_owned()),
            other => other.clone(),
        };
        let bytes = parse_size(&size).map_err(|m| {
            // A bare word ("fast", "max") is a misspelt keyword more likely than a size.
            let word = matches!(&size, RawSize::Str(s) if s.trim().bytes().all(|b| b.is_ascii_alphabetic()));
            let m = if word {
                format!(r#"expected {hint}a rate such as "100MiB", found {}"#, describe(written))
            } else {
                m
            };
            self.at(raw, key, m)
        })?;
        if bytes < min {
            let why = format!(
                "{} is not allowed; use {hint}at least {min_text} (bytes per second)",
                describe(written)
            );
            return Err(self.at(raw, key, why));
        }
        Ok(bytes)
    }

    /// One `[[node]]` (`key` is `node[i]`). `names` maps the node names seen so far to
    /// their lines, `endpoints` the addresses and socket paths; this node's are added.
    fn node(
        &self,
        key: &str,
        table: &Spanned<RawNode>,
        resource: &str,
        tls_on: bool,
        names: &mut HashMap<String, usize>,
        endpoints: &mut Endpoints,
    ) -> Result<NodeConfig, ConfigError> {
        let raw = table.get_ref();
        let k = |field: &str| format!("{key}.{field}");
        let name_s = self.required(&raw.name, table, &k("name"))?;
        let name = name_s.get_ref();
        check_name(name).map_err(|m| self.at(name_s, &k("name"), m))?;
        match names.entry(name.clone()) {
            Entry::Occupied(first) => {
                return Err(self.at(
                    name_s,
                    &k("name"),
                    format!("duplicate node name {name:?} (first defined at line {})", first.get()),
                ));
            }
            Entry::Vacant(slot) => {
                slot.insert(self.line(name_s.span().start));
            }
        }

        let repl_s = self.required(&raw.replication, table, &k("replication"))?;
        let repl_key = k("replication");
        let replication = parse_host_port(repl_s.get_ref()).map_err(|m| self.at(repl_s, &repl_key, m))?;
        if replication.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()) {
            return Err(self.at(
                repl_s,
                &repl_key,
                format!(
                    "{:?}: {} is a wildcard address; peers need an address they can connect to",
                    repl_s.get_ref(),
                    replication.host
                ),
            ));
        }
        let line = self.line(repl_s.span().start);
        endpoints
            .add(Endpoint::tcp(&replication), &repl_key, line)
            .map_err(|m| self.at(repl_s, &repl_key, m))?;

        let nbd_s = self.required(&raw.nbd, table, &k("nbd"))?;
        let nbd_key = k("nbd");
        let items: Vec<(String, Range<usize>, &str)> = match nbd_s.get_ref() {
            RawNbd::One(s) => vec![(nbd_key.clone(), nbd_s.span(), s.as_str())],
            RawNbd::Many(list) if list.is_empty() => {
                return Err(self.at(
                    nbd_s,
                    &nbd_key,
                    r#"the array is empty; give at least one address such as "127.0.0.1:10809""#.into(),
                ));
            }
            RawNbd::Many(list) => list
                .iter()
                .enumerate()
                .map(|(j, s)| (format!("{nbd_key}[{j}]"), s.span(), s.get_ref().as_str()))
                .collect(),
        };
        let mut nbd = Vec::with_capacity(items.len());
        for (item_key, span, text) in items {
            let err = |m| self.invalid(Some(span.clone()), &item_key, m);
            let addr = parse_listen_addr(text).map_err(err)?;
            endpoints.add(Endpoint::listen(&addr), &item_key, self.line(span.start)).map_err(err)?;
            nbd.push(addr);
        }

        let disk_s = self.required(&raw.disk, table, &k("disk"))?;
        check_abs_path(disk_s.get_ref()).map_err(|m| self.at(disk_s, &k("disk"), m))?;
        let disk = PathBuf::from(disk_s.get_ref());

        let meta_s = self.required(&raw.meta, table, &k("meta"))?;
        let meta = match meta_s.get_ref().0.as_str() {
            "internal" => MetaLocation::Internal,
            path => {
                check_abs_path(path).map_err(|_| {
                    self.at(
                        meta_s,
                        &k("meta"),
                        format!(r#"expected "internal" or an absolute path, found {path:?}"#),
                    )
                })?;
                if Path::new(path) == disk {
                    return Err(self.at(
                        meta_s,
                        &k("meta"),
                        format!(r#"{path:?} is also the disk; use "internal" to keep metadata on the disk"#),
                    ));
                }
                MetaLocation::External(PathBuf::from(path))
            }
        };

        let control_key = k("control");
        let control = match &raw.control {
            Some(c) => {
                check_unix_path(c.get_ref()).map_err(|m| self.at(c, &control_key, m))?;
                endpoints
                    .add(Endpoint::Unix(PathBuf::from(c.get_ref())), &control_key, self.line(c.span().start))
                    .map_err(|m| self.at(c, &control_key, m))?;
                PathBuf::from(c.get_ref())
            }
            None => {
                let path = format!("{DEFAULT_CONTROL_DIR}/{resource}-{name}.sock");
                if path.len() > UNIX_PATH_MAX {
                    return Err(self.at(
                        name_s,
                        &k("name"),
                        format!(
                            "the default control socket path {path:?} is longer than \
                             {UNIX_PATH_MAX} bytes; use a shorter name or set `control`"
                        ),
                    ));
                }
                endpoints
                    .add(
                        Endpoint::Unix(PathBuf::from(&path)),
                        &format!("{control_key} (default)"),
                        self.line(table.span().start),
                    )
                    .map_err(|m| self.at(table, &control_key, m))?;
                PathBuf::from(path)
            }
        };

        let control_group = match &raw.control_group {
            Some(g) if g.get_ref().is_empty() || g.get_ref().contains(['/', ':', '\n']) => {
                return Err(self.at(
                    g,
                    &k("control-group"),
                    format!("{:?} is not a group name", g.get_ref()),
                ));
            }
            Some(g) => Some(g.get_ref().clone()),
            None => None,
        };
        let metrics_key = k("metrics");
        let metrics = match &raw.metrics {
            Some(m) => {
                let hp = parse_host_port(m.get_ref()).map_err(|e| self.at(m, &metrics_key, e))?;
                endpoints
                    .add(Endpoint::tcp(&hp), &metrics_key, self.line(m.span().start))
                    .map_err(|e| self.at(m, &metrics_key, e))?;
                Some(hp)
            }
            None => None,
        };

        let handler = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<String>, ConfigError> {
            match v {
                Some(cmd) if cmd.get_ref().trim().is_empty() => {
                    Err(self.at(cmd, &k(key), "an empty command; leave the key out instead".to_string()))
                }
                Some(cmd) => Ok(Some(cmd.get_ref().clone())),
                None => Ok(None),
            }
        };
        let handlers = Handlers {
            fence_peer: handler(&raw.fence_peer, "fence-peer")?,
            after_resync_target: handler(&raw.after_resync_target, "after-resync-target")?,
        };

        let oom_score_adj = match &raw.oom_score_adj {
            None => DEFAULT_OOM_SCORE_ADJ,
            Some(n) => self.int_in(n, &k("oom-score-adj"), -1000..=1000, "-1000 to 1000")?,
        };
        let mlock = raw.mlock.as_ref().is_some_and(|m| *m.get_ref());
        let worker_threads = match &raw.worker_threads {
            None => None,
            Some(n) => Some(self.int_in(
                n,
                &k("worker-threads"),
                1..=MAX_WORKER_THREADS,
                &format!("1 to {MAX_WORKER_THREADS}"),
            )?),
        };

        let tls = self.node_tls(key, table, name_s, tls_on)?;
        let nbd_tls = self.nbd_tls(key, table)?;
        let undo_dir = match &raw.undo_dir {
            None => PathBuf::from(DEFAULT_UNDO_DIR),
            Some(d) => {
                check_abs_path(d.get_ref()).map_err(|m| self.at(d, &k("undo-dir"), m))?;
                PathBuf::from(d.get_ref())
            }
        };

        let lines = NodeLines { disk: self.line(disk_s.span().start), meta: self.line(meta_s.span().start) };
        Ok(NodeConfig {
            name: name.clone(),
            replication,
            nbd,
            disk,
            meta,
            control,
            control_group,
            metrics,
            handlers,
            mlock,
            oom_score_adj,
            tls,
            nbd_tls,
            undo_dir,
            worker_threads,
            lines,
        })
    }
}

/// `localhost`, 127.0.0.0/8 or ::1. Other names may resolve anywhere.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Something a node listens on, normalised for comparison: IP addresses by value,
/// DNS names case-insensitively and without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Endpoint {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Endpoint {
    fn tcp(hp: &HostPort) -> Endpoint {
        let host = match hp.host.parse::<IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => hp.host.trim_end_matches('.').to_ascii_lowercase(),
        };
        Endpoint::Tcp(host, hp.port)
    }

    fn listen(addr: &ListenAddr) -> Endpoint {
        match addr {
            ListenAddr::Tcp(hp) => Endpoint::tcp(hp),
            ListenAddr::Unix(p) => Endpoint::Unix(p.clone()),
        }
    }
}

/// Every endpoint seen so far, with the key and line that first used it.
#[derive(Default)]
struct Endpoints(HashMap<Endpoint, (String, usize)>);

impl Endpoints {
    fn add(&mut self, ep: Endpoint, key: &str, line: usize) -> Result<(), String> {
        match self.0.entry(ep) {
            Entry::Vacant(slot) => {
                slot.insert((key.to_owned(), line));
                Ok(())
            }
            Entry::Occupied(first) => {
                let (first_key, first_line) = first.get();
                let what = match first.key() {
                    Endpoint::Tcp(host, port) if host.contains(':') => {
                        format!("address [{host}]:{port}")
                    }
                    Endpoint::Tcp(host, port) => format!("address {host}:{port}"),
                    Endpoint::Unix(p) => format!("socket path {:?}", p.display().to_string()),
                };
                Err(format!("{what} is already used by {first_key} (line {first_line})"))
            }
        }
    }
}

/// A size as the user wrote it, for messages.
pub(super) fn describe(raw: &RawSize) -> String {
    match raw {
        RawSize::Int(v) => v.to_string(),
        RawSize::Float(v) => v.to_string(),
        RawSize::Str(s) => format!("{s:?}"),
    }
}

/// `node[1].nbd`: map keys joined by dots, array indices in brackets; the private keys
/// of `toml::Spanned` wrappers are left out.
fn key_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if key.starts_with("$__serde_spanned_private_") {
                    continue;
                }
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// serde's words for kinds of values, in TOML's words.
fn toml_words(s: &str) -> String {
    match s {
        "map" => "a table".into(),
        "sequence" => "an array".into(),
        "a map" => "a table".into(),
        "a sequence" => "an array".into(),
        "unit value" => "an empty value".into(),
        other => other.replace("floating point", "float"),
    }
}

/// Messages must stay on one line.
fn one_line(s: &str) -> String {
    s.trim().lines().map(str::trim).collect::<Vec<_>>().join("; ")
}
