//! The WAN keys of `[resource]`: `compression`, `compression-level`,
//! `replication-rate` (defaults, values, precise errors, `show`).

use std::path::Path;

use super::tests::{err, ok, with_resource_line as with_resource};
use super::*;

#[test]
fn compression_defaults_values_and_errors() {
    let r = ok(&with_resource("protocol = \"C\"")).resource;
    assert_eq!((r.compression, r.compression_level), (Compression::Off, 3));
    let r = ok(&with_resource("compression = \"zstd\"")).resource;
    assert_eq!((r.compression, r.compression_level), (Compression::Zstd, DEFAULT_COMPRESSION_LEVEL));
    let r = ok(&with_resource("compression = \"zstd\"\ncompression-level = 19")).resource;
    assert_eq!(r.compression_level, 19);
    assert_eq!(ok(&with_resource("compression = \"off\"")).resource.compression, Compression::Off);
    assert_eq!(ok(&with_resource("compression-level = 1")).resource.compression_level, 1);

    assert_eq!(
        err(&with_resource("compression = \"lz4\"")),
        r#"r0.toml:3: key `resource.compression`: expected "off" or "zstd", found "lz4""#
    );
    assert_eq!(
        err(&with_resource("compression = true")),
        r#"r0.toml:3: key `resource.compression`: expected "off" or "zstd", found boolean `true`"#
    );
    for level in ["0", "20", "-1", "4294967299"] {
        assert_eq!(
            err(&with_resource(&format!("compression = \"zstd\"\ncompression-level = {level}"))),
            format!(
                "r0.toml:4: key `resource.compression-level`: {level} is not allowed; use a zstd level from 1 \
                 (fastest) to 19 (smallest); default 3"
            )
        );
    }
    assert_eq!(
        err(&with_resource("compression-level = \"3\"")),
        r#"r0.toml:3: key `resource.compression-level`: expected an integer, found string "3""#
    );
}

#[test]
fn replication_rate_values_and_errors() {
    assert_eq!(ok(&with_resource("protocol = \"A\"")).resource.replication_rate_bytes_per_sec, None);
    let r = ok(&with_resource("protocol = \"A\"\nreplication-rate = \"100MiB\"")).resource;
    assert_eq!(r.replication_rate_bytes_per_sec, Some(100 << 20));
    let r = ok(&with_resource("protocol = \"B\"\nreplication-rate = \"64KiB/s\"")).resource;
    assert_eq!(r.replication_rate_bytes_per_sec, Some(64 << 10));

    let key = "r0.toml:4: key `resource.replication-rate`: ";
    assert_eq!(
        err(&with_resource("protocol = \"C\"\nreplication-rate = \"100MiB\"")),
        format!(
            "{key}replication-rate needs protocol A or B: under protocol C every write waits for the peer"
        )
    );
    // Protocol C is the default.
    assert_eq!(
        err(&with_resource("replication-rate = \"100MiB\"")),
        "r0.toml:3: key `resource.replication-rate`: replication-rate needs protocol A or B: under \
         protocol C every write waits for the peer"
    );
    assert_eq!(
        err(&with_resource("protocol = \"A\"\nreplication-rate = \"1KiB\"")),
        format!(r#"{key}"1KiB" is not allowed; use at least 64KiB (bytes per second)"#)
    );
    assert_eq!(
        err(&with_resource("protocol = \"A\"\nreplication-rate = \"auto\"")),
        format!(
            r#"{key}"auto" is not allowed here; give a rate such as "100MiB", or leave the key out for no limit"#
        )
    );
    assert_eq!(
        err(&with_resource("protocol = \"A\"\nreplication-rate = \"fast\"")),
        format!(r#"{key}expected a rate such as "100MiB", found "fast""#)
    );
    let e = err(&with_resource("protocol = \"A\"\nreplication-rate = \"10MB\""));
    assert!(e.starts_with(key) && e.contains("MiB"), "{e}");
}

#[test]
fn show_prints_the_wan_keys_and_parses_again() {
    let cfg = ok(&with_resource(
        "protocol = \"A\"\ncompression = \"zstd\"\ncompression-level = 7\nreplication-rate = \"12MiB\"",
    ));
    let shown = cfg.effective_toml();
    assert!(
        shown.contains("compression = \"zstd\"\ncompression-level = 7\nreplication-rate = 12582912\n"),
        "{shown}"
    );
    let again = Config::parse(&shown, Path::new("shown.toml")).unwrap();
    assert_eq!(again.resource, cfg.resource);
    let plain = ok(&with_resource("")).effective_toml();
    assert!(
        plain.contains("compression = \"off\"\ncompression-level = 3\n")
            && !plain.contains("replication-rate")
    );
}
