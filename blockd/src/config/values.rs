//! Parsers for single values (sizes, addresses, names, paths). Each returns the message
//! for the error line on failure; the caller adds file, line and key.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::raw::RawSize;
use super::{HostPort, ListenAddr};

/// Longest path a Unix socket address can hold (`sun_path` is 108 bytes with the NUL).
pub(super) const UNIX_PATH_MAX: usize = 107;

const UNITS: [(&str, u32); 5] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10), ("B", 0)];
const UNIT_LIST: &str = "B, KiB, MiB, GiB or TiB";

/// A size: a non-negative TOML integer (bytes) or a string `N[ ]UNIT` with UNIT one of
/// `B`, `KiB`, `MiB`, `GiB`, `TiB` (or none, meaning bytes).
pub(super) fn parse_size(raw: &RawSize) -> Result<u64, String> {
    match raw {
        RawSize::Int(v) if *v < 0 => Err(format!("{v} is not a size; sizes cannot be negative")),
        RawSize::Int(v) => Ok(v.unsigned_abs()),
        RawSize::Float(v) => {
            Err(format!("{v} is not a size; use a whole number of bytes or a string such as \"4KiB\""))
        }
        RawSize::Str(s) => parse_size_str(s),
    }
}

fn parse_size_str(text: &str) -> Result<u64, String> {
    let generic = || {
        format!(
            "{text:?} is not a size; expected a number of bytes or a number with a unit \
             ({UNIT_LIST}), such as \"4KiB\""
        )
    };
    let s = text.trim();
    if s.starts_with('-') {
        return Err(format!("{text:?} is not a size; sizes cannot be negative"));
    }
    let num_end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = (&s[..num_end], s[num_end..].trim_start());
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) if !i.is_empty() && !f.is_empty() && !f.contains('.') => (i, Some(f)),
        Some(_) => return Err(generic()),
        None if num.is_empty() => return Err(generic()),
        None => (num, None),
    };
    let shift = match UNITS.iter().find(|(u, _)| *u == unit) {
        Some((_, shift)) => *shift,
        None if unit.is_empty() => 0,
        None if !unit.bytes().all(|b| b.is_ascii_alphabetic()) => return Err(generic()),
        None => {
            return Err(match suggest_unit(unit) {
                Some(good) => {
                    format!("{text:?} is not a size; use a binary suffix such as \"{num}{good}\"")
                }
                None => format!("{text:?} is not a size; the unit must be one of {UNIT_LIST}"),
            });
        }
    };
    let too_large = || format!("{text:?} is too large; the largest size is {} bytes", u64::MAX);
    // u64::MAX has 20 digits; with at most 20 digits and a 2^40 unit, u128 cannot overflow.
    if int.trim_start_matches('0').len() > 20 {
        return Err(too_large());
    }
    let int: u128 = int.parse().map_err(|_| generic())?;
    let unit = 1u128 << shift;
    let Some(frac) = frac else {
        return u64::try_from(int * unit).map_err(|_| too_large());
    };
    // A fraction: reject it, but when it comes out as whole bytes suggest the largest
    // unit that writes it as a whole number ("1.5GiB" -> "1536MiB").
    let frac = frac.trim_end_matches('0');
    let not_whole = || format!("{text:?} is not a size; use a whole number of bytes or of a unit");
    if frac.len() > 18 {
        return Err(not_whole());
    }
    let scale = 10u128.pow(frac.len() as u32);
    let frac_val: u128 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| generic())? };
    // int <= 10^20, scale <= 10^18: the product fits; times 2^40 it may not, but then
    // the size is far beyond u64 anyway.
    let scaled = (int * scale + frac_val).checked_mul(unit).ok_or_else(too_large)?;
    if scaled % scale != 0 {
        return Err(not_whole());
    }
    let bytes = u64::try_from(scaled / scale).map_err(|_| too_large())?;
    let (unit, shift) =
        UNITS.iter().find(|(_, shift)| bytes % (1u64 << shift) == 0).copied().unwrap_or(("B", 0));
    Err(format!("{text:?} is not a size; use a whole number such as \"{}{unit}\"", bytes >> shift))
}

/// `K`, `kb`, `GB`, `gib`, ... -> the binary IEC spelling; `None` for anything else.
fn suggest_unit(unit: &str) -> Option<&'static str> {
    let lower = unit.to_ascii_lowercase();
    let (letter, rest) = lower.split_at(lower.chars().next().map_or(0, char::len_utf8));
    if !matches!(rest, "" | "b" | "i" | "ib") {
        return None;
    }
    Some(match letter {
        "k" => "KiB",
        "m" => "MiB",
        "g" => "GiB",
        "t" => "TiB",
        "b" if rest.is_empty() => "B",
        _ => return None,
    })
}

/// `host:port` or `[v6]:port`; the host is an IPv4 address, a bracketed IPv6 address or
/// a DNS name.
pub(super) fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let Some((host, after)) = rest.split_once(']') else {
            return Err(format!("{text:?} is missing the closing \"]\" of its IPv6 address"));
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("{text:?}: {host:?} is not an IPv6 address"));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(format!("{text:?} has no port; expected \"[{host}]:PORT\""));
        };
        (host, port)
    } else {
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("expected \"host:port\", found {text:?}"));
        };
        if host.contains(':') {
            // "::1:7789" is itself an IPv6 address, but "[::1]:7789" is the likely intent.
            let example = if host.parse::<Ipv6Addr>().is_ok() || text.parse::<Ipv6Addr>().is_err() {
                format!("[{host}]:{port}")
            } else {
                format!("[{text}]:PORT")
            };
            return Err(format!("{text:?}: an IPv6 address must be written in brackets, e.g. {example:?}"));
        }
        if host.is_empty() {
            return Err(format!("{text:?} has no host; expected \"host:port\""));
        }
        check_host(host).map_err(|why| format!("{text:?}: {why}"))?;
        (host, port)
    };
    let port = parse_port(port).map_err(|why| format!("{text:?}: {why}"))?;
    Ok(HostPort { host: host.to_owned(), port })
}

fn parse_port(port: &str) -> Result<u16, String> {
    if port.is_empty() {
        return Err("the port is missing".into());
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {port:?} is not a number"));
    }
    match port.parse::<u64>() {
        Ok(0) => Err("port 0 is not allowed; use a port from 1 to 65535".into()),
        Ok(p) if p <= u64::from(u16::MAX) => Ok(p as u16),
        _ => Err(format!("port {port} is out of range; use a port from 1 to 65535")),
    }
}

/// An IPv4 address or a DNS name (labels of letters, digits, `-` and `_`).
fn check_host(host: &str) -> Result<(), String> {
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{host:?} is not a valid IPv4 address"));
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("{host:?} is not a valid host name or IP address"));
    }
    Ok(())
}

/// `unix:/abs/path` or `host:port`.
pub(super) fn parse_listen_addr(text: &str) -> Result<ListenAddr, String> {
    match text.strip_prefix("unix:") {
        Some(path) => {
            if path.is_empty() {
                return Err(format!("{text:?} has no path; expected \"unix:/path\""));
            }
            check_unix_path(path).map_err(|why| format!("{text:?}: {why}"))?;
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        }
        None => parse_host_port(text).map(ListenAddr::Tcp),
    }
}

/// An absolute path short enough for a Unix socket address.
pub(super) fn check_unix_path(path: &str) -> Result<(), String> {
    check_abs_path(path)?;
    if path.len() > UNIX_PATH_MAX {
        return Err(format!(
            "the socket path is {} bytes long; Unix sockets allow at most {UNIX_PATH_MAX}",
            path.len()
        ));
    }
    Ok(())
}

/// A non-empty absolute path without NUL bytes.
pub(super) fn check_abs_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.contains('\0') {
        return Err(format!("{path:?} contains a NUL character"));
    }
    if !Path::new(path).is_absolute() {
        return Err(format!("{path:?} is a relative path; use an absolute path"));
    }
    Ok(())
}

/// Resource and node names: they end up in file names, socket paths and NBD export
/// names, and node names are matched against host names.
pub(super) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the name must not be empty".into());
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        return Err(format!("{name:?} contains {c:?}; names may use letters, digits, '-', '_' and '.'"));
    }
    if name.starts_with(['-', '.']) {
        return Err(format!("{name:?} must start with a letter, digit or '_'"));
    }
    Ok(())
}
