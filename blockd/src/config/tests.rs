use std::path::{Path, PathBuf};

use super::raw::RawSize;
use super::values::parse_size;
use super::*;

/// The example of SPEC §8.1, verbatim (line numbers matter to the tests below).
const SPEC_EXAMPLE: &str = r#"[resource]
name = "r0"
protocol = "C"                    # "A" | "B" | "C"
# size = "10GiB"                  # optional; default: the smallest backing store
# bitmap-granularity = "4KiB"     # optional

[[node]]
name = "alpha"
replication = "127.0.0.1:7789"    # where peers reach this node; host may be a DNS name
nbd = "127.0.0.1:10809"           # where this node exports the device while Primary;
                                  # "unix:/path" for a Unix socket; an array for several
disk = "/var/lib/blockd/r0-alpha.img"   # block device or regular file
meta = "internal"                 # or a path to an external metadata file
# control = "/run/blockd/r0-alpha.sock" # optional; this default when absent

[[node]]
name = "beta"
replication = "127.0.0.1:7790"
nbd = "127.0.0.1:10810"
disk = "/var/lib/blockd/r0-beta.img"
meta = "internal"
"#;

// Line numbers in SPEC_EXAMPLE.
const L_PROTOCOL: usize = 3;
pub(super) const L_SIZE: usize = 4; // a comment, free to replace
pub(super) const L_GRANULARITY: usize = 5; // a comment, free to replace
pub(super) const L_NODE0: usize = 7;
pub(super) const L_NODE0_NAME: usize = 8;
pub(super) const L_NODE0_REPL: usize = 9;
const L_NODE0_NBD: usize = 10;
pub(super) const L_NODE0_FREE: usize = 11; // a comment, free to replace
const L_NODE0_DISK: usize = 12;
const L_NODE0_META: usize = 13;
pub(super) const L_NODE0_CONTROL: usize = 14; // a comment, free to replace
const L_NODE1: usize = 16;
const L_NODE1_NAME: usize = 17;
const L_NODE1_REPL: usize = 18;
const L_NODE1_NBD: usize = 19;

/// SPEC_EXAMPLE with some lines (1-based) replaced; replacements keep one line each so
/// the other line numbers stay valid.
pub(super) fn spec_with(edits: &[(usize, &str)]) -> String {
    let mut lines: Vec<&str> = SPEC_EXAMPLE.lines().collect();
    for &(line, text) in edits {
        assert!(!text.contains('\n'), "an edit must stay on one line");
        lines[line - 1] = text;
    }
    lines.join("\n") + "\n"
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("r0.toml"))
}

pub(super) fn ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("expected a valid config, got: {e}"))
}

/// The error line for `text`, checked to be one line.
pub(super) fn err(text: &str) -> String {
    let e = match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    };
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "not one line: {msg:?}");
    msg
}

fn tcp(host: &str, port: u16) -> HostPort {
    HostPort { host: host.into(), port }
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(&RawSize::Str(s.into()))
}

#[test]
fn spec_example_parses_with_defaults() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!(c.path, PathBuf::from("r0.toml"));
    assert_eq!(
        c.resource,
        ResourceConfig {
            name: "r0".into(),
            protocol: Protocol::C,
            size_bytes: None,
            bitmap_granularity_bytes: 4096,
            send_buffer_bytes: DEFAULT_SEND_BUFFER_BYTES,
            al_extents: 1237,
            resync_rate: ResyncRate::Auto,
            resync_min_rate_bytes_per_sec: 8 << 20,
            resync_checksum: false,
            shared_secret: None,
            allow_unauthenticated_peers: false,
            tls_ca: None,
            on_io_error: IoErrorPolicy::Detach,
            ack_timeout_ms: DEFAULT_ACK_TIMEOUT_MS,
            on_congestion: CongestionPolicy::Block,
            congestion_fill_bytes: DEFAULT_CONGESTION_FILL_BYTES,
            undo_size_bytes: DEFAULT_UNDO_SIZE_BYTES,
            compression: Compression::Off,
            compression_level: DEFAULT_COMPRESSION_LEVEL,
            replication_rate_bytes_per_sec: None,
        }
    );
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(
        c.nodes[0],
        NodeConfig {
            name: "alpha".into(),
            replication: tcp("127.0.0.1", 7789),
            nbd: vec![ListenAddr::Tcp(tcp("127.0.0.1", 10809))],
            disk: "/var/lib/blockd/r0-alpha.img".into(),
            meta: MetaLocation::Internal,
            control: "/run/blockd/r0-alpha.sock".into(),
            control_group: None,
            metrics: None,
            handlers: Handlers::default(),
            mlock: false,
            oom_score_adj: DEFAULT_OOM_SCORE_ADJ,
            tls: None,
            nbd_tls: NbdTls::default(),
            undo_dir: DEFAULT_UNDO_DIR.into(),
            worker_threads: None,
            lines: NodeLines { disk: L_NODE0_DISK, meta: L_NODE0_META },
        }
    );
    assert_eq!(c.nodes[1].lines, NodeLines { disk: 20, meta: 21 });
    assert_eq!(c.nodes[1].name, "beta");
    assert_eq!(c.nodes[1].replication.to_string(), "127.0.0.1:7790");
    assert_eq!(c.nodes[1].control, PathBuf::from("/run/blockd/r0-beta.sock"));
}

#[test]
fn protocol_default_and_explicit() {
    let c = ok(&spec_with(&[(L_PROTOCOL, "")]));
    assert_eq!(c.resource.protocol, Protocol::C);
    for (text, want) in [("A", Protocol::A), ("B", Protocol::B), ("C", Protocol::C)] {
        let line = format!("protocol = {text:?}");
        let c = ok(&spec_with(&[(L_PROTOCOL, &line)]));
        assert_eq!(c.resource.protocol, want);
        assert_eq!(c.resource.protocol.to_string(), text);
    }
}

#[test]
fn protocol_errors() {
    assert_eq!(
        err(&spec_with(&[(L_PROTOCOL, r#"protocol = "D""#)])),
        r#"r0.toml:3: key `resource.protocol`: expected "A", "B" or "C", found "D""#
    );
    assert_eq!(
        err(&spec_with(&[(L_PROTOCOL, "protocol = 3")])),
        r#"r0.toml:3: key `resource.protocol`: expected "A", "B" or "C", found integer `3`"#
    );
}

#[test]
fn nbd_array_with_unix_socket() {
    let c = ok(&spec_with(&[(
        L_NODE0_NBD,
        r#"nbd = ["127.0.0.1:10809", "unix:/run/blockd/r0.nbd", "[::]:10811"]"#,
    )]));
    let nbd = &c.nodes[0].nbd;
    assert_eq!(
        nbd,
        &vec![
            ListenAddr::Tcp(tcp("127.0.0.1", 10809)),
            ListenAddr::Unix("/run/blockd/r0.nbd".into()),
            ListenAddr::Tcp(tcp("::", 10811)),
        ]
    );
    let shown: Vec<String> = nbd.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["127.0.0.1:10809", "unix:/run/blockd/r0.nbd", "[::]:10811"]);
}

#[test]
fn single_unix_nbd() {
    let c = ok(&spec_with(&[(L_NODE0_NBD, r#"nbd = "unix:/tmp/r0-alpha.nbd""#)]));
    assert_eq!(c.nodes[0].nbd, [ListenAddr::Unix("/tmp/r0-alpha.nbd".into())]);
}

#[test]
fn ipv6_and_dns_hosts() {
    let c = ok(&spec_with(&[
        (L_NODE0_REPL, r#"replication = "[fe80::1]:7789""#),
        (L_NODE0_NBD, r#"nbd = "[::1]:10809""#),
        (L_NODE1_REPL, r#"replication = "beta.example.com:7790""#),
        (L_SIZE, r#"shared-secret = "0123456789abcdef""#),
    ]));
    assert_eq!(c.nodes[0].replication, tcp("fe80::1", 7789));
    assert_eq!(c.nodes[0].replication.to_string(), "[fe80::1]:7789");
    assert_eq!(c.nodes[0].nbd, [ListenAddr::Tcp(tcp("::1", 10809))]);
    assert_eq!(c.nodes[0].nbd[0].to_string(), "[::1]:10809");
    assert_eq!(c.nodes[1].replication, tcp("beta.example.com", 7790));
    // HostPort resolves like (host, port): brackets are not part of the host.
    let addrs: Vec<_> = std::net::ToSocketAddrs::to_socket_addrs(&tcp("::1", 10809))
        .expect("an IP literal needs no DNS")
        .collect();
    assert_eq!(addrs, ["[::1]:10809".parse().expect("literal")]);
}

#[test]
fn sizes_accepted() {
    assert_eq!(size("10GiB"), Ok(10 << 30));
    assert_eq!(size("4 KiB"), Ok(4096));
    assert_eq!(size(" 2MiB "), Ok(2 << 20));
    assert_eq!(size("1TiB"), Ok(1 << 40));
    assert_eq!(size("512B"), Ok(512));
    assert_eq!(size("1048576"), Ok(1 << 20));
    assert_eq!(size("15TiB"), Ok(15 << 40));
    assert_eq!(parse_size(&RawSize::Int(1048576)), Ok(1 << 20));

    let c =
        ok(&spec_with(&[(L_SIZE, "size = 1048576"), (L_GRANULARITY, r#"bitmap-granularity = "64 KiB""#)]));
    assert_eq!(c.resource.size_bytes, Some(1 << 20));
    assert_eq!(c.resource.bitmap_granularity_bytes, 64 << 10);
    let c = ok(&spec_with(&[(L_SIZE, r#"size = "10GiB""#)]));
    assert_eq!(c.resource.size_bytes, Some(10 << 30));
}

#[test]
fn sizes_rejected() {
    let no = |s: &str| size(s).expect_err(s);
    assert_eq!(no("10GB"), r#""10GB" is not a size; use a binary suffix such as "10GiB""#);
    assert_eq!(no("10 G"), r#""10 G" is not a size; use a binary suffix such as "10GiB""#);
    assert_eq!(no("4kib"), r#""4kib" is not a size; use a binary suffix such as "4KiB""#);
    assert_eq!(no("-1"), r#""-1" is not a size; sizes cannot be negative"#);
    assert_eq!(parse_size(&RawSize::Int(-1)), Err("-1 is not a size; sizes cannot be negative".into()));
    assert_eq!(no("1.5GiB"), r#""1.5GiB" is not a size; use a whole number such as "1536MiB""#);
    assert_eq!(no("0.1KiB"), r#""0.1KiB" is not a size; use a whole number of bytes or of a unit"#);
    assert_eq!(
        parse_size(&RawSize::Float(1.5)),
        Err(r#"1.5 is not a size; use a whole number of bytes or a string such as "4KiB""#.into())
    );
    assert_eq!(no("10PiB"), r#""10PiB" is not a size; the unit must be one of B, KiB, MiB, GiB or TiB"#);
    let generic = |s: &str| {
        format!(
            "{s:?} is not a size; expected a number of bytes or a number with a unit \
             (B, KiB, MiB, GiB or TiB), such as \"4KiB\""
        )
    };
    for bad in ["", "GiB", "1..5GiB", ".5GiB", "0x1000", "+5"] {
        assert_eq!(no(bad), generic(bad), "{bad:?}");
    }
    // Overflow: 2^64 bytes is one too many; so are absurdly long numbers.
    assert_eq!(size("16777215TiB"), Ok(16777215 << 40));
    let too_large = |s: &str| format!("{s:?} is too large; the largest size is 18446744073709551615 bytes");
    for big in [
        "16777216TiB",
        "18446744073709551616",
        "99999999999999999999999999999999999999999TiB",
        "20000000.5TiB",
    ] {
        assert_eq!(no(big), too_large(big), "{big:?}");
    }
}

#[test]
fn size_errors_in_file() {
    assert_eq!(
        err(&spec_with(&[(L_SIZE, r#"size = "10GB""#)])),
        r#"r0.toml:4: key `resource.size`: "10GB" is not a size; use a binary suffix such as "10GiB""#
    );
    assert_eq!(
        err(&spec_with(&[(L_SIZE, "size = -1")])),
        "r0.toml:4: key `resource.size`: -1 is not a size; sizes cannot be negative"
    );
    assert_eq!(
        err(&spec_with(&[(L_SIZE, "size = 0")])),
        "r0.toml:4: key `resource.size`: the size must not be zero"
    );
    assert_eq!(
        err(&spec_with(&[(L_SIZE, "size = 1000")])),
        "r0.toml:4: key `resource.size`: 1000 bytes is not a multiple of 512 bytes"
    );
    assert_eq!(
        err(&spec_with(&[(L_SIZE, r#"size = "1000 B""#)])),
        r#"r0.toml:4: key `resource.size`: "1000 B" (1000 bytes) is not a multiple of 512 bytes"#
    );
    assert_eq!(
        err(&spec_with(&[(L_SIZE, "size = true")])),
        r#"r0.toml:4: key `resource.size`: expected a size (a number of bytes, or a string such as "4KiB"), found boolean `true`"#
    );
}

#[test]
fn bitmap_granularity_range() {
    for (text, bytes) in [(r#""4KiB""#, 4096), (r#""1MiB""#, 1 << 20), ("65536", 65536)] {
        let line = format!("bitmap-granularity = {text}");
        let c = ok(&spec_with(&[(L_GRANULARITY, &line)]));
        assert_eq!(c.resource.bitmap_granularity_bytes, bytes);
    }
    for (text, shown) in [
        (r#""3KiB""#, r#""3KiB""#),
        (r#""2KiB""#, r#""2KiB""#),
        (r#""2MiB""#, r#""2MiB""#),
        ("12288", "12288"),
    ] {
        let line = format!("bitmap-granularity = {text}");
        assert_eq!(
            err(&spec_with(&[(L_GRANULARITY, &line)])),
            format!(
                "r0.toml:5: key `resource.bitmap-granularity`: {shown} is not allowed; \
                 use a power of two from 4KiB to 1MiB"
            )
        );
    }
}

#[test]
fn unknown_keys() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, r#"nbd-addr = "127.0.0.1:10809""#)])),
        "r0.toml:10: key `node[0].nbd-addr`: unknown key \
         (expected one of: name, replication, nbd, disk, meta, control, control-group, metrics, \
         fence-peer, after-resync-target, mlock, oom-score-adj, tls-cert, tls-key, nbd-tls, nbd-tls-cert, \
         nbd-tls-key, nbd-tls-ca, undo-dir, worker-threads)"
    );
    assert_eq!(
        err(&spec_with(&[(L_GRANULARITY, "bitmap_granularity = 4096")])),
        "r0.toml:5: key `resource.bitmap_granularity`: unknown key \
         (expected one of: name, protocol, size, bitmap-granularity, send-buffer, al-extents, \
         resync-rate, resync-min-rate, resync-checksum, shared-secret, allow-unauthenticated-peers, tls-ca, \
         on-io-error, ack-timeout, on-congestion, congestion-fill, undo-size, compression, compression-level, replication-rate)"
    );
    assert_eq!(
        err(&spec_with(&[(1, "[resources]")])),
        "r0.toml:1: key `resources`: unknown key (expected one of: resource, node)"
    );
}

#[test]
fn missing_required_keys_point_at_table_header() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_DISK, "")])),
        format!("r0.toml:{L_NODE0}: key `node[0].disk`: missing required key")
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NBD, "")])),
        format!("r0.toml:{L_NODE1}: key `node[1].nbd`: missing required key")
    );
    assert_eq!(err(&spec_with(&[(2, "")])), "r0.toml:1: key `resource.name`: missing required key");
    // Inline tables: the line of the table.
    let inline = "resource = { name = \"r0\" }\n\
                  node = [\n  { name = \"a\", replication = \"h:1\", nbd = \"h:2\", disk = \"/d\" },\n]\n";
    assert_eq!(err(inline), "r0.toml:3: key `node[0].meta`: missing required key");
}

#[test]
fn missing_tables_and_no_nodes() {
    assert_eq!(
        err(""),
        "r0.toml: key `resource`: missing required table; add a [resource] table with a name"
    );
    assert_eq!(
        err("[resource]\nname = \"r0\"\n"),
        "r0.toml: key `node`: missing required table; add a [[node]] table for each node"
    );
    assert_eq!(
        err("node = []\n[resource]\nname = \"r0\"\n"),
        "r0.toml:1: key `node`: at least one node is required"
    );
}

#[test]
fn single_node_and_more_than_two_nodes_are_accepted() {
    let one: String = SPEC_EXAMPLE.lines().take(14).collect::<Vec<_>>().join("\n");
    assert_eq!(ok(&one).nodes.len(), 1);
    let three = format!(
        "{SPEC_EXAMPLE}\n[[node]]\nname = \"gamma\"\nreplication = \"127.0.0.1:7791\"\n\
         nbd = \"127.0.0.1:10811\"\ndisk = \"/var/lib/blockd/r0-gamma.img\"\nmeta = \"internal\"\n"
    );
    let c = ok(&three);
    let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    let peers: Vec<&str> = c.peers("beta").map(|n| n.name.as_str()).collect();
    assert_eq!(peers, ["alpha", "gamma"]);
}

#[test]
fn duplicate_node_name() {
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NAME, r#"name = "alpha""#)])),
        format!(
            r#"r0.toml:{L_NODE1_NAME}: key `node[1].name`: duplicate node name "alpha" (first defined at line {L_NODE0_NAME})"#
        )
    );
}

#[test]
fn duplicate_addresses_across_nodes() {
    assert_eq!(
        err(&spec_with(&[(L_NODE1_REPL, r#"replication = "127.0.0.1:7789""#)])),
        "r0.toml:18: key `node[1].replication`: address 127.0.0.1:7789 is already used by \
         node[0].replication (line 9)"
    );
    // IPv6 addresses compare by value, not by spelling.
    assert_eq!(
        err(&spec_with(&[
            (L_NODE0_REPL, r#"replication = "[::1]:7789""#),
            (L_NODE1_REPL, r#"replication = "[0:0::1]:7789""#),
        ])),
        "r0.toml:18: key `node[1].replication`: address [::1]:7789 is already used by \
         node[0].replication (line 9)"
    );
    // NBD and replication share the TCP port space.
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NBD, r#"nbd = "127.0.0.1:7789""#)])),
        "r0.toml:19: key `node[1].nbd`: address 127.0.0.1:7789 is already used by \
         node[0].replication (line 9)"
    );
    assert_eq!(
        err(&spec_with(&[
            (L_NODE0_NBD, r#"nbd = "unix:/run/blockd/r0.nbd""#),
            (L_NODE1_NBD, r#"nbd = ["127.0.0.1:10810", "unix:/run/blockd/r0.nbd"]"#),
        ])),
        r#"r0.toml:19: key `node[1].nbd[1]`: socket path "/run/blockd/r0.nbd" is already used by node[0].nbd (line 10)"#
    );
    // Within one node too.
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, r#"nbd = ["127.0.0.1:10809", "127.0.0.1:10809"]"#)])),
        "r0.toml:10: key `node[0].nbd[1]`: address 127.0.0.1:10809 is already used by \
         node[0].nbd[0] (line 10)"
    );
}

#[test]
fn duplicate_control_socket() {
    assert_eq!(
        err(&format!("{SPEC_EXAMPLE}control = \"/run/blockd/r0-alpha.sock\"\n")),
        r#"r0.toml:22: key `node[1].control`: socket path "/run/blockd/r0-alpha.sock" is already used by node[0].control (default) (line 7)"#
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_DISK, "disk = 5")])),
        "r0.toml:12: key `node[0].disk`: expected a string, found integer `5`"
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, "nbd = 10809")])),
        r#"r0.toml:10: key `node[0].nbd`: expected an address ("host:port" or "unix:/path") or an array of them, found integer `10809`"#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, r#"nbd = ["127.0.0.1:10809", 10810]"#)])),
        "r0.toml:10: key `node[0].nbd[1]`: expected a string, found integer `10810`"
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_META, "meta = false")])),
        r#"r0.toml:13: key `node[0].meta`: expected "internal" or a path, found boolean `false`"#
    );
    assert_eq!(
        err("[resource]\nname = \"r0\"\n[node]\nname = \"a\"\n"),
        "r0.toml:3: key `node`: expected an array, found a table; \
         write [[node]] (double brackets) for each node"
    );
    assert_eq!(
        err("resource = \"r0\"\n"),
        "r0.toml:1: key `resource`: expected a [resource] table, found string \"r0\""
    );
}

#[test]
fn toml_syntax_errors() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_DISK, r#"disk = "/var/lib/blockd/r0-alpha.img"#)])),
        "r0.toml:12: invalid TOML: invalid basic string, expected `\"`"
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_FREE, r#"name = "again""#)])),
        "r0.toml:11: invalid TOML: duplicate key `name`"
    );
    // CRLF line endings count lines the same way.
    let crlf = spec_with(&[(L_PROTOCOL, r#"protocol = "D""#)]).replace('\n', "\r\n");
    assert_eq!(err(&crlf), r#"r0.toml:3: key `resource.protocol`: expected "A", "B" or "C", found "D""#);
}

#[test]
fn names_checked() {
    assert_eq!(
        err(&spec_with(&[(2, r#"name = """#)])),
        "r0.toml:2: key `resource.name`: the name must not be empty"
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NAME, r#"name = """#)])),
        "r0.toml:17: key `node[1].name`: the name must not be empty"
    );
    assert_eq!(
        err(&spec_with(&[(2, r#"name = "r0/x""#)])),
        r#"r0.toml:2: key `resource.name`: "r0/x" contains '/'; names may use letters, digits, '-', '_' and '.'"#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NAME, r#"name = "-alpha""#)])),
        r#"r0.toml:8: key `node[0].name`: "-alpha" must start with a letter, digit or '_'"#
    );
    let long = format!("name = \"{}\"", "n".repeat(100));
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NAME, &long)])),
        format!(
            "r0.toml:8: key `node[0].name`: the default control socket path \
             \"/run/blockd/r0-{}.sock\" is longer than 107 bytes; use a shorter name or set \
             `control`",
            "n".repeat(100)
        )
    );
}

#[test]
fn host_port_errors() {
    let repl = |value: &str| {
        let line = format!("replication = {value:?}");
        err(&spec_with(&[(L_NODE0_REPL, &line)]))
    };
    let prefix = "r0.toml:9: key `node[0].replication`: ";
    for (value, why) in [
        ("127.0.0.1:0", r#""127.0.0.1:0": port 0 is not allowed; use a port from 1 to 65535"#),
        ("127.0.0.1:70000", r#""127.0.0.1:70000": port 70000 is out of range; use a port from 1 to 65535"#),
        ("127.0.0.1:", r#""127.0.0.1:": the port is missing"#),
        ("127.0.0.1:x", r#""127.0.0.1:x": port "x" is not a number"#),
        ("127.0.0.1", r#"expected "host:port", found "127.0.0.1""#),
        (":7789", r#"":7789" has no host; expected "host:port""#),
        ("::1:7789", r#""::1:7789": an IPv6 address must be written in brackets, e.g. "[::1]:7789""#),
        ("fe80::1", r#""fe80::1": an IPv6 address must be written in brackets, e.g. "[fe80::1]:PORT""#),
        ("[::1]", r#""[::1]" has no port; expected "[::1]:PORT""#),
        ("[::1:7789", r#""[::1:7789" is missing the closing "]" of its IPv6 address"#),
        ("[alpha]:7789", r#""[alpha]:7789": "alpha" is not an IPv6 address"#),
        ("127.0.0.256:7789", r#""127.0.0.256:7789": "127.0.0.256" is not a valid IPv4 address"#),
        ("bad host:7789", r#""bad host:7789": "bad host" is not a valid host name or IP address"#),
        (
            "0.0.0.0:7789",
            r#""0.0.0.0:7789": 0.0.0.0 is a wildcard address; peers need an address they can connect to"#,
        ),
    ] {
        assert_eq!(repl(value), format!("{prefix}{why}"), "{value:?}");
    }
}

#[test]
fn nbd_errors() {
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, "nbd = []")])),
        r#"r0.toml:10: key `node[0].nbd`: the array is empty; give at least one address such as "127.0.0.1:10809""#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_NBD, r#"nbd = ["127.0.0.1:10809", "unix:r0.sock"]"#)])),
        r#"r0.toml:10: key `node[0].nbd[1]`: "unix:r0.sock": "r0.sock" is a relative path; use an absolute path"#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NBD, r#"nbd = "unix:""#)])),
        r#"r0.toml:19: key `node[1].nbd`: "unix:" has no path; expected "unix:/path""#
    );
    let long = format!("nbd = \"unix:/{}\"", "s".repeat(107));
    assert_eq!(
        err(&spec_with(&[(L_NODE1_NBD, &long)])),
        format!(
            "r0.toml:19: key `node[1].nbd`: \"unix:/{}\": the socket path is 108 bytes long; \
             Unix sockets allow at most 107",
            "s".repeat(107)
        )
    );
    // Multi-line arrays: each element reports its own line.
    let text = SPEC_EXAMPLE
        .replace("nbd = \"127.0.0.1:10810\"", "nbd = [\n  \"127.0.0.1:10810\",\n  \"127.0.0.1:0\",\n]");
    assert_eq!(
        err(&text),
        r#"r0.toml:21: key `node[1].nbd[1]`: "127.0.0.1:0": port 0 is not allowed; use a port from 1 to 65535"#
    );
}

#[test]
fn disk_meta_control_paths() {
    let c = ok(&spec_with(&[
        (L_NODE0_META, r#"meta = "/var/lib/blockd/r0-alpha.meta""#),
        (L_NODE0_CONTROL, r#"control = "/tmp/alpha.sock""#),
    ]));
    assert_eq!(c.nodes[0].meta, MetaLocation::External("/var/lib/blockd/r0-alpha.meta".into()));
    assert_eq!(c.nodes[0].control, PathBuf::from("/tmp/alpha.sock"));
    assert_eq!(
        err(&spec_with(&[(L_NODE0_DISK, r#"disk = "r0-alpha.img""#)])),
        r#"r0.toml:12: key `node[0].disk`: "r0-alpha.img" is a relative path; use an absolute path"#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_META, r#"meta = "external""#)])),
        r#"r0.toml:13: key `node[0].meta`: expected "internal" or an absolute path, found "external""#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_META, r#"meta = "/var/lib/blockd/r0-alpha.img""#)])),
        r#"r0.toml:13: key `node[0].meta`: "/var/lib/blockd/r0-alpha.img" is also the disk; use "internal" to keep metadata on the disk"#
    );
    assert_eq!(
        err(&spec_with(&[(L_NODE0_CONTROL, r#"control = "alpha.sock""#)])),
        r#"r0.toml:14: key `node[0].control`: "alpha.sock" is a relative path; use an absolute path"#
    );
}

#[test]
fn local_node_by_name() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!(c.local_node(Some("beta")).expect("beta exists").name, "beta");
    let e = c.local_node(Some("gamma")).expect_err("no gamma");
    assert_eq!(e.to_string(), r#"r0.toml: no node named "gamma" (nodes: alpha, beta)"#);
    let peers: Vec<&str> = c.peers("alpha").map(|n| n.name.as_str()).collect();
    assert_eq!(peers, ["beta"]);
}

#[test]
fn local_node_by_host_name() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!(c.node_for_host("alpha").expect("exact").name, "alpha");
    assert_eq!(c.node_for_host("beta.example.com").expect("first label").name, "beta");
    assert_eq!(
        c.node_for_host("vm").expect_err("no match").to_string(),
        r#"r0.toml: no node matches this host's name "vm"; pass --node (nodes: alpha, beta)"#
    );

    // The real host name, through local_node(None).
    let host = nix::unistd::gethostname().expect("gethostname");
    let host = host.to_str().expect("UTF-8 host name");
    let edited = format!("name = {host:?}");
    match parse(&spec_with(&[(L_NODE1_NAME, &edited)])) {
        Ok(c) => assert_eq!(c.local_node(None).expect("this host").name, host),
        // A host name our name rules refuse cannot be a node name at all.
        Err(e) => assert_eq!(e.key(), Some("node[1].name"), "{e}"),
    }
}

#[test]
fn load_reads_files_and_reports_io_errors() {
    let dir = std::env::temp_dir().join(format!("blockd-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("r0.toml");
    std::fs::write(&file, SPEC_EXAMPLE).expect("write");
    let c = Config::load(&file).expect("valid");
    assert_eq!(c.path, file);
    assert_eq!(c.nodes.len(), 2);

    std::fs::write(&file, spec_with(&[(L_PROTOCOL, r#"protocol = "D""#)])).expect("write");
    assert_eq!(
        Config::load(&file).expect_err("invalid").to_string(),
        format!(r#"{}:3: key `resource.protocol`: expected "A", "B" or "C", found "D""#, file.display())
    );

    let missing = dir.join("nope.toml");
    let e = Config::load(&missing).expect_err("missing");
    assert_eq!(
        e.to_string(),
        format!("{}: cannot read: No such file or directory (os error 2)", missing.display())
    );
    assert!(matches!(e, ConfigError::Read { .. }));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn error_accessors() {
    let e = parse(&spec_with(&[(L_PROTOCOL, r#"protocol = "D""#)])).expect_err("bad");
    assert_eq!(e.line(), Some(3));
    assert_eq!(e.key(), Some("resource.protocol"));
    let e = parse("[resource\n").expect_err("bad");
    assert_eq!(e.line(), Some(1));
    assert_eq!(e.key(), None);
}

#[test]
fn effective_toml_round_trips_with_defaults_filled() {
    let text = "[resource]\nname = \"r0\"\nsize = \"1GiB\"\n\n[[node]]\nname = \"alpha\"\n\
                replication = \"127.0.0.1:7789\"\nnbd = \"unix:/tmp/a b.sock\"\n\
                disk = \"/var/lib/blockd/a.img\"\nmeta = \"internal\"\n";
    let cfg = Config::parse(text, Path::new("r0.toml")).unwrap();
    let shown = cfg.effective_toml();
    assert!(
        shown.contains(
            "protocol = \"C\"\nsize = 1073741824\nbitmap-granularity = 4096\nsend-buffer = 67108864\n\
             al-extents = 1237\nresync-rate = \"auto\"\nresync-min-rate = 8388608\nresync-checksum = false\n"
        ),
        "{shown}"
    );
    assert!(shown.contains("control = \"/run/blockd/r0-alpha.sock\""), "{shown}");
    let again = Config::parse(&shown, Path::new("shown.toml")).unwrap();
    // The keys sit on other lines in the shown text; the values are what must match.
    let unplaced = |nodes: Vec<NodeConfig>| -> Vec<NodeConfig> {
        nodes.into_iter().map(|n| NodeConfig { lines: NodeLines::default(), ..n }).collect()
    };
    assert_eq!((again.resource, unplaced(again.nodes)), (cfg.resource, unplaced(cfg.nodes)));
}

#[test]
fn send_buffer_is_a_bounded_size() {
    let base = "[resource]\nname = \"r0\"\nsend-buffer = SIZE\n\n[[node]]\nname = \"alpha\"\n\
                replication = \"127.0.0.1:7789\"\nnbd = \"127.0.0.1:10809\"\ndisk = \"/d.img\"\nmeta = \"internal\"\n";
    let cfg = Config::parse(&base.replace("SIZE", "\"8MiB\""), Path::new("r0.toml")).unwrap();
    assert_eq!(cfg.resource.send_buffer_bytes, 8 << 20);
    let err = Config::parse(&base.replace("SIZE", "\"1KiB\""), Path::new("r0.toml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "r0.toml:3: key `resource.send-buffer`: \"1KiB\" is not allowed; use 64KiB to 4GiB"
    );
}

/// A minimal config with one `[resource]` line set to `line` (line 3).
pub(super) fn with_resource_line(line: &str) -> String {
    format!(
        "[resource]\nname = \"r0\"\n{line}\n\n[[node]]\nname = \"alpha\"\nreplication = \"127.0.0.1:7789\"\n\
         nbd = \"127.0.0.1:10809\"\ndisk = \"/d.img\"\nmeta = \"internal\"\n"
    )
}

#[test]
fn al_extents_default_range_and_errors() {
    assert_eq!(ok(SPEC_EXAMPLE).resource.al_extents, DEFAULT_AL_EXTENTS);
    assert_eq!(DEFAULT_AL_EXTENTS, 1237);
    assert_eq!(crate::meta::DEFAULT_AL_EXTENTS, DEFAULT_AL_EXTENTS);
    for n in [16, 1237, 8000] {
        assert_eq!(ok(&with_resource_line(&format!("al-extents = {n}"))).resource.al_extents, n);
    }
    for n in ["15", "0", "-1", "8001", "4294967312", "9223372036854775807"] {
        assert_eq!(
            err(&with_resource_line(&format!("al-extents = {n}"))),
            format!(
                "r0.toml:3: key `resource.al-extents`: {n} is not allowed; use 16 to 8000 (extents of 4MiB)"
            )
        );
    }
    assert_eq!(
        err(&with_resource_line(r#"al-extents = "1237""#)),
        r#"r0.toml:3: key `resource.al-extents`: expected an integer, found string "1237""#
    );
    assert_eq!(
        err(&with_resource_line("al-extents = 12.5")),
        "r0.toml:3: key `resource.al-extents`: expected an integer, found float `12.5`"
    );
}

#[test]
fn resync_rate_auto_or_fixed() {
    assert_eq!(ok(SPEC_EXAMPLE).resource.resync_rate, ResyncRate::Auto);
    for (text, want) in [
        (r#""auto""#, ResyncRate::Auto),
        (r#""100MiB""#, ResyncRate::Fixed { bytes_per_sec: 100 << 20 }),
        (r#""100MiB/s""#, ResyncRate::Fixed { bytes_per_sec: 100 << 20 }),
        (r#""1 GiB/s""#, ResyncRate::Fixed { bytes_per_sec: 1 << 30 }),
        ("1048576", ResyncRate::Fixed { bytes_per_sec: 1 << 20 }),
    ] {
        let c = ok(&with_resource_line(&format!("resync-rate = {text}")));
        assert_eq!(c.resource.resync_rate, want, "{text}");
    }
    let e = |text: &str| err(&with_resource_line(&format!("resync-rate = {text}")));
    let key = "r0.toml:3: key `resource.resync-rate`: ";
    assert_eq!(
        e(r#""512KiB""#),
        format!(r#"{key}"512KiB" is not allowed; use "auto" or at least 1MiB (bytes per second)"#)
    );
    assert_eq!(
        e("1048575"),
        format!(r#"{key}1048575 is not allowed; use "auto" or at least 1MiB (bytes per second)"#)
    );
    assert_eq!(e(r#""fast""#), format!(r#"{key}expected "auto" or a rate such as "100MiB", found "fast""#));
    assert_eq!(e(r#""Auto""#), format!(r#"{key}expected "auto" or a rate such as "100MiB", found "Auto""#));
    assert_eq!(
        e(r#""100MB/s""#),
        format!(r#"{key}"100MB" is not a size; use a binary suffix such as "100MiB""#)
    );
    assert_eq!(e("-5"), format!("{key}-5 is not a size; sizes cannot be negative"));
    assert_eq!(
        e("true"),
        format!(
            r#"{key}expected a rate (bytes per second, or a string such as "100MiB"), found boolean `true`"#
        )
    );
}

#[test]
fn resync_min_rate_and_checksum() {
    let c = ok(SPEC_EXAMPLE);
    assert_eq!((c.resource.resync_min_rate_bytes_per_sec, c.resource.resync_checksum), (8 << 20, false));
    let c = ok(&with_resource_line(r#"resync-min-rate = "20MiB/s""#));
    assert_eq!(c.resource.resync_min_rate_bytes_per_sec, 20 << 20);
    let c = ok(&with_resource_line("resync-min-rate = 1048576"));
    assert_eq!(c.resource.resync_min_rate_bytes_per_sec, 1 << 20);
    let key = "r0.toml:3: key `resource.resync-min-rate`: ";
    assert_eq!(
        err(&with_resource_line(r#"resync-min-rate = "auto""#)),
        format!(r#"{key}"auto" is not allowed here; give a rate such as "8MiB""#)
    );
    assert_eq!(
        err(&with_resource_line(r#"resync-min-rate = "1KiB""#)),
        format!(r#"{key}"1KiB" is not allowed; use at least 1MiB (bytes per second)"#)
    );
    assert_eq!(
        err(&with_resource_line(r#"resync-min-rate = "slow""#)),
        format!(r#"{key}expected a rate such as "100MiB", found "slow""#)
    );

    assert!(ok(&with_resource_line("resync-checksum = true")).resource.resync_checksum);
    assert!(!ok(&with_resource_line("resync-checksum = false")).resource.resync_checksum);
    assert_eq!(
        err(&with_resource_line(r#"resync-checksum = "yes""#)),
        r#"r0.toml:3: key `resource.resync-checksum`: expected a boolean, found string "yes""#
    );
}

#[test]
fn effective_toml_round_trips_new_keys() {
    let text = with_resource_line(
        "al-extents = 3000\nresync-rate = \"250MiB/s\"\nresync-min-rate = \"4MiB\"\nresync-checksum = true",
    );
    let cfg = ok(&text);
    let r = &cfg.resource;
    assert_eq!(
        (r.al_extents, r.resync_rate, r.resync_min_rate_bytes_per_sec, r.resync_checksum),
        (3000, ResyncRate::Fixed { bytes_per_sec: 250 << 20 }, 4 << 20, true)
    );
    let shown = cfg.effective_toml();
    assert!(
        shown.contains(
            "al-extents = 3000\nresync-rate = 262144000\nresync-min-rate = 4194304\nresync-checksum = true\n"
        ),
        "{shown}"
    );
    let again = Config::parse(&shown, Path::new("shown.toml")).unwrap();
    assert_eq!(again.resource, cfg.resource);
}

#[test]
fn metrics_and_control_group_keys() {
    let c = ok(&spec_with(&[
        (L_NODE0_CONTROL, "metrics = \"127.0.0.1:9942\""),
        (L_NODE0_FREE, "control-group = \"blockd\""),
    ]));
    assert_eq!(c.nodes[0].metrics.as_ref().map(ToString::to_string).as_deref(), Some("127.0.0.1:9942"));
    assert_eq!(c.nodes[0].control_group.as_deref(), Some("blockd"));
    let shown = c.effective_toml();
    assert!(shown.contains("metrics = \"127.0.0.1:9942\"") && shown.contains("control-group = \"blockd\""));
    assert_eq!(
        err(&spec_with(&[(L_NODE0_CONTROL, "metrics = \"127.0.0.1:7789\"")])),
        "r0.toml:14: key `node[0].metrics`: address 127.0.0.1:7789 is already used by node[0].replication (line 9)"
    );
}

#[test]
fn io_path_safety_keys() {
    let c = ok(&spec_with(&[(L_NODE0_CONTROL, "mlock = true"), (L_NODE0_FREE, "oom-score-adj = -500")]));
    assert!(c.nodes[0].mlock);
    assert_eq!(c.nodes[0].oom_score_adj, -500);
    assert!(!c.nodes[1].mlock);
    assert_eq!(c.nodes[1].oom_score_adj, DEFAULT_OOM_SCORE_ADJ);
    let shown = c.effective_toml();
    assert!(shown.contains("mlock = true\noom-score-adj = -500"), "{shown}");
    assert_eq!(
        err(&spec_with(&[(L_NODE0_FREE, "oom-score-adj = -1001")])),
        format!(
            "r0.toml:{L_NODE0_FREE}: key `node[0].oom-score-adj`: -1001 is not allowed; use -1000 to 1000"
        )
    );
    assert!(err(&spec_with(&[(L_NODE0_FREE, "mlock = \"yes\"")])).contains("node[0].mlock"));
}

#[test]
fn worker_threads_key() {
    let c = ok(&spec_with(&[(L_NODE0_FREE, "worker-threads = 4")]));
    assert_eq!((c.nodes[0].worker_threads, c.nodes[1].worker_threads), (Some(4), None));
    assert_eq!((c.worker_threads(&c.nodes[0]), c.worker_threads(&c.nodes[1])), (4, 2));
    let shown = c.effective_toml();
    assert_eq!(shown.matches("worker-threads").count(), 1, "{shown}");
    assert!(shown.contains("worker-threads = 4\n"), "{shown}");
    let standalone = ok("[resource]\nname = \"r0\"\n\n[[node]]\nname = \"alpha\"\n\
         replication = \"127.0.0.1:7789\"\nnbd = \"127.0.0.1:10809\"\ndisk = \"/d.img\"\nmeta = \"internal\"\n");
    assert_eq!(standalone.worker_threads(&standalone.nodes[0]), 1);
    for bad in ["0", "257", "-1"] {
        assert_eq!(
            err(&spec_with(&[(L_NODE0_FREE, &format!("worker-threads = {bad}"))])),
            format!(
                "r0.toml:{L_NODE0_FREE}: key `node[0].worker-threads`: {bad} is not allowed; use 1 to 256"
            )
        );
    }
    assert!(err(&spec_with(&[(L_NODE0_FREE, "worker-threads = \"2\"")])).contains("node[0].worker-threads"));
}

#[test]
fn peers_off_loopback_must_authenticate() {
    let off = r#"replication = "10.0.0.1:7789""#;
    assert_eq!(
        err(&spec_with(&[(L_NODE0_REPL, off)])),
        format!(
            "r0.toml:{L_NODE0_REPL}: key `node[0].replication`: 10.0.0.1:7789 is not a loopback address, so \
             peers must authenticate: set resource.tls-ca (mutual TLS, with tls-cert and tls-key on every \
             node) or resource.shared-secret (the same on every node), or \
             resource.allow-unauthenticated-peers = true"
        )
    );
    let secret = r#"shared-secret = "0123456789abcdef""#;
    let c = ok(&spec_with(&[(L_NODE0_REPL, off), (L_SIZE, secret)]));
    assert_eq!(c.resource.shared_secret.as_ref().map(|s| s.as_bytes()), Some(&b"0123456789abcdef"[..]));
    assert_eq!(format!("{:?}", c.resource.shared_secret), "Some(SharedSecret(<hidden>))");
    let shown = c.effective_toml();
    assert!(!shown.contains("0123456789abcdef") && shown.contains("# shared-secret: set (not shown)"));
    let c = ok(&spec_with(&[(L_NODE0_REPL, off), (L_SIZE, "allow-unauthenticated-peers = true")]));
    assert!(c.resource.allow_unauthenticated_peers && c.resource.shared_secret.is_none());
    // Loopback pairs (tests, a demo on one machine) need neither; "localhost" counts.
    ok(&spec_with(&[(L_NODE0_REPL, r#"replication = "localhost:7789""#)]));
    assert_eq!(
        err(&spec_with(&[(L_SIZE, r#"shared-secret = "short""#)])),
        format!(
            "r0.toml:{L_SIZE}: key `resource.shared-secret`: 5 bytes is too short; use at least 16 (e.g. the \
             output of `openssl rand -base64 32`)"
        )
    );
}

#[test]
fn on_io_error_and_ack_timeout() {
    let c = ok(&with_resource_line("on-io-error = \"pass-on\"\nack-timeout = \"30s\""));
    assert_eq!((c.resource.on_io_error, c.resource.ack_timeout_ms), (IoErrorPolicy::PassOn, 30_000));
    let c = ok(&with_resource_line("ack-timeout = 15"));
    assert_eq!(c.resource.ack_timeout_ms, 15_000);
    assert_eq!(
        err(&with_resource_line("on-io-error = \"panic\"")),
        r#"r0.toml:3: key `resource.on-io-error`: expected "detach" or "pass-on", found "panic""#
    );
    assert_eq!(
        err(&with_resource_line("ack-timeout = \"100ms\"")),
        r#"r0.toml:3: key `resource.ack-timeout`: "100ms" is not allowed; use 2s to 1h"#
    );
    assert!(err(&with_resource_line("ack-timeout = \"soon\"")).contains("is not a duration"));
    let shown = ok(&with_resource_line("on-io-error = \"pass-on\"")).effective_toml();
    assert!(shown.contains("on-io-error = \"pass-on\"\nack-timeout = \"10000ms\""), "{shown}");
}
