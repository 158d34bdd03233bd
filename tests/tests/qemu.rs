//! qemu's independent NBD client: qemu-io patterns (FUA, flush, write
//! zeroes, unmap, discard) and qemu-img convert/compare/map/info.

use blockd_tests::*;

/// Runs qemu-io on the export with the given `-c` commands; fails on a
/// non-zero exit or any failure message (pattern mismatches included).
fn qemu_io(srv: &Server, cmds: &[&str]) -> String {
    let mut args = vec!["-f".to_string(), "raw".to_string(), srv.uri()];
    for c in cmds {
        args.push("-c".into());
        args.push((*c).to_string());
    }
    let out = tool("qemu-io", &args);
    let all = format!("{}\n{}", out.stdout, out.stderr).to_lowercase();
    assert!(
        !all.contains("fail") && !all.contains("error"),
        "qemu-io reported a failure\n{}",
        out.describe()
    );
    out.stdout
}

engine_tests! {
    fn qemu_io_write_read_fua_flush_zero_discard(srv) {
        let out = qemu_io(&srv, &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -f -P 0xcd 1M 64k",          // FUA
            "read -P 0xcd 1M 64k",
            "flush",
            "write -P 0xee 2M 1M",
            "write -z 2M 1M",                   // WRITE_ZEROES (NO_HOLE)
            "read -P 0 2M 1M",
            "write -P 0xee 3M 1M",
            "write -z -u 3M 1M",                // WRITE_ZEROES, may unmap
            "read -P 0 3M 1M",
            "write -P 0x11 4M 2M",
            "discard 4608k 1M",                 // TRIM
            "read -P 0x11 4M 512k",
            "read -P 0x11 5632k 512k",
            "write -f -z 6M 64k",               // WRITE_ZEROES + FUA
            "read -P 0 6M 64k",
            "flush",
        ]);
        assert!(out.contains("wrote 1048576/1048576 bytes at offset 0"), "{out}");
        assert!(out.contains("discard 1048576/1048576 bytes at offset 4718592"), "{out}");
        // A new connection sees all of it.
        qemu_io(&srv, &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 1M 64k",
            "read -P 0 2M 2M",
            "read -P 0x11 4M 512k",
            "read -P 0x11 5632k 512k",
            "read -P 0 6M 64k",
            "read -P 0 7M 1M",                  // never written
        ]);
    }

    fn qemu_img_convert_compare_map_info(srv) {
        let seed = srv.path("seed.img");
        // Random data with a 4 MiB all-zero stretch, so convert's zero
        // detection sends WRITE_ZEROES over previously written data.
        random_file(&seed, srv.size(), 0x5eed, 16 * MIB, 4 * MIB);
        qemu_io(&srv, &["write -P 0xab 0 64M"]);
        tool("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw",
                          seed.to_str().unwrap(), &srv.uri()]);
        let out = tool("qemu-img", ["compare", "-f", "raw", "-F", "raw",
                                    seed.to_str().unwrap(), &srv.uri()]);
        assert!(out.stdout.contains("Images are identical"), "{}", out.describe());

        // compare must notice a difference (guards against a vacuous pass).
        qemu_io(&srv, &["write -P 0x01 32M 512"]);
        let diff = run_capture(
            std::process::Command::new(require("qemu-img")).args(
                ["compare", "-f", "raw", "-F", "raw", seed.to_str().unwrap(), &srv.uri()]),
            tools::TOOL_TIMEOUT,
        );
        assert_eq!(diff.status.code(), Some(1), "compare did not see a change\n{}",
                   diff.describe());
        assert!(diff.stdout.contains("33554432"), "{}", diff.describe());

        let info = tool("qemu-img", ["info", "--output=json", "-f", "raw", &srv.uri()]);
        let v: serde_json::Value = serde_json::from_str(&info.stdout).expect("json");
        assert_eq!(v["virtual-size"].as_u64(), Some(srv.size()), "{v}");

        // map (base:allocation): extents cover the whole device.
        let map = tool("qemu-img", ["map", "--output=json", "-f", "raw", &srv.uri()]);
        let v: serde_json::Value = serde_json::from_str(&map.stdout).expect("json");
        let ex = v.as_array().expect("map array");
        let mut pos = 0;
        for e in ex {
            assert_eq!(e["start"].as_u64(), Some(pos), "{e}");
            pos += e["length"].as_u64().expect("length");
        }
        assert_eq!(pos, srv.size(), "map does not cover the device");
        assert_eq!(ex[0]["data"], true, "{}", map.stdout);
    }
}
