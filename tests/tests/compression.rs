//! Compression on the peer link (issue 15) with real processes: a pair with
//! `compression = "zstd"`, ext4 on the Primary's export (nbdfuse → loop →
//! mkfs.ext4), ordinary files copied from /usr/share and /usr/lib, part of them
//! while the Secondary is down (so they reach it by resync). Asserts that the copies
//! converge (verify: 0 out of sync, backing stores equal, files intact, fsck clean),
//! that the link says zstd on both sides, and that ordinary files shrink on the wire
//! (`sent_wire_bytes` below the data replicated and resynced); then that random
//! data (incompressible) never costs more on the wire than its frames uncompressed.
//! Prints the ratio and the CPU time of both daemons per MiB for the closing note
//! (no timing thresholds). Needs root, FUSE, loop devices, e2fsprogs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockd_tests::guards::{FuseMount, LoopDev, Mount, require_fs_privileges};
use blockd_tests::pair::{Pair, PairOpts};
use blockd_tests::scatter::assert_data_equal;
use blockd_tests::*;
use rand::{RngCore, SeedableRng};

/// Bytes of ordinary files copied from each source tree.
const FILES_BYTES_EACH: u64 = 24 * MIB;
/// Files larger than this are skipped (more, smaller files: a filesystem's mix).
const MAX_FILE_BYTES: u64 = 4 * MIB;
const RANDOM_BYTES: usize = 16 << 20;
const SETTLE: Duration = Duration::from_secs(300);

/// Regular files under `root` in sorted walk order, up to `budget` bytes in all.
fn pick_files(root: &Path, budget: u64) -> Vec<PathBuf> {
    fn walk(dir: &Path, left: &mut u64, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if *left == 0 {
                return;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.is_dir() {
                walk(&p, left, out);
            } else if meta.is_file()
                && (1..=MAX_FILE_BYTES).contains(&meta.len())
                && std::fs::File::open(&p).is_ok()
            {
                *left = left.saturating_sub(meta.len());
                out.push(p);
            }
        }
    }
    let (mut left, mut out) = (budget, Vec::new());
    walk(root, &mut left, &mut out);
    assert!(left == 0, "{} holds less than {budget} bytes of files", root.display());
    out
}

/// Copies `files` under `dest` (keeping their paths), fsyncs them, and syncs.
fn copy_files(files: &[PathBuf], dest: &Path) {
    for f in files {
        let to = dest.join(f.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(f, &to).unwrap_or_else(|e| panic!("copy {}: {e}", f.display()));
        std::fs::File::open(&to).and_then(|f| f.sync_all()).expect("fsync");
    }
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

fn check_copies(files: &[PathBuf], dest: &Path) {
    for f in files {
        let to = dest.join(f.strip_prefix("/").expect("absolute"));
        let (want, got) = (std::fs::read(f).expect("source"), std::fs::read(&to).expect("copy"));
        assert!(want == got, "{} differs from its source", to.display());
    }
}

/// utime + stime of `pid` in seconds (`/proc/PID/stat` fields 14 and 15).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // After the comm: field 3 (state) is index 0, so 14 and 15 are 11 and 12.
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// What the Primary's status says of its link.
#[derive(Clone, Copy, Debug)]
struct Link {
    replicated: u64,
    resync: u64,
    wire: u64,
    uncompressed: u64,
    cpu: [f64; 2],
}

/// `base`: CPU seconds of each node's earlier processes (beta is restarted); a
/// stopped node's CPU is all in `base`.
fn link(p: &Pair, base: [f64; 2]) -> Link {
    let cpu =
        [0, 1].map(|n| base[n] + p.nodes[n].daemon.as_ref().and_then(|d| d.pid()).map_or(0.0, cpu_secs));
    Link {
        replicated: p.peer_u64(0, "replicated_bytes"),
        resync: p.peer_u64(0, "resync_sent_bytes"),
        wire: p.peer_u64(0, "sent_wire_bytes"),
        uncompressed: p.peer_u64(0, "sent_uncompressed_bytes"),
        cpu,
    }
}

/// Prints a phase's figures; returns (data bytes, wire bytes, uncompressed bytes).
fn report(what: &str, a: Link, b: Link) -> (u64, u64, u64) {
    let data = (b.replicated - a.replicated) + (b.resync - a.resync);
    let (wire, frames) = (b.wire - a.wire, b.uncompressed - a.uncompressed);
    let mib = data as f64 / MIB as f64;
    let (alpha, beta) = (b.cpu[0] - a.cpu[0], b.cpu[1] - a.cpu[1]);
    eprintln!(
        "{what}: {mib:.1} MiB of data ({} replicated, {} resynced), {frames} frame bytes, {wire} on the wire: \
         ratio {:.2}; CPU alpha {alpha:.2} s, beta {beta:.2} s = {:.1} ms/MiB",
        b.replicated - a.replicated,
        b.resync - a.resync,
        frames as f64 / wire.max(1) as f64,
        (alpha + beta) * 1000.0 / mib.max(1e-9),
    );
    (data, wire, frames)
}

#[test]
fn ordinary_files_shrink_on_the_wire_and_random_data_never_grows() {
    require_fs_privileges();
    for t in ["mkfs.ext4", "e2fsck", "losetup", "mount", "umount", "nbdfuse"] {
        require(t);
    }
    let opts = PairOpts {
        disk_bytes: 192 * MIB,
        extra_resource: "compression = \"zstd\"\ncompression-level = 3\n".into(),
        ..PairOpts::default()
    };
    let mut p = Pair::start("compression", &opts);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    for n in 0..2 {
        assert_eq!(p.peer(n)["compression"], "zstd", "node {n}: {}", p.status(n));
    }
    let share = pick_files(Path::new("/usr/share"), FILES_BYTES_EACH);
    let lib = pick_files(Path::new("/usr/lib"), FILES_BYTES_EACH);
    let size = p.export_size(0);

    let fuse = FuseMount::mount(&p.dir.join("fuse"), &p.uri(0), &p.dir.join("nbdfuse.log"), size);
    let lo = LoopDev::attach(&fuse.file());
    let dev = lo.dev().to_str().expect("utf-8").to_string();
    tool("mkfs.ext4", ["-q", "-F", &dev]);
    let m = Mount::new(lo.dev(), &p.dir.join("mnt"), "ext4");

    // Phase 1: files replicated as they are written, then more while beta is down
    // (they reach it by resync).
    let start = link(&p, [0.0; 2]);
    copy_files(&share, &m.path().join("share"));
    let replicated = link(&p, [0.0; 2]);
    report("  of which replicated as written", start, replicated);
    let beta_cpu = cpu_secs(p.daemon(1).pid().expect("running"));
    p.stop_node(1);
    let base = [0.0, beta_cpu];
    let alone = link(&p, base);
    copy_files(&lib, &m.path().join("lib"));
    let written = link(&p, base);
    eprintln!("  written while beta was down: CPU alpha {:.2} s", written.cpu[0] - alone.cpu[0]);
    p.start_node(1);
    p.wait_synced(SETTLE);
    let files = link(&p, base);
    report("  of which resynced", Link { cpu: [written.cpu[0], beta_cpu], ..written }, files);
    let (data, wire, frames) = report("ordinary files (zstd level 3)", start, files);
    assert!(files.resync > start.resync, "part of the files went by resync");
    assert!(wire < data, "compressible files did not shrink: {wire} wire bytes for {data} data bytes");
    assert!(wire < frames, "{wire} wire bytes, {frames} uncompressed");

    // Phase 2: random data goes raw, never larger than uncompressed.
    let mut random = vec![0u8; RANDOM_BYTES];
    rand::rngs::StdRng::seed_from_u64(15).fill_bytes(&mut random);
    let path = m.path().join("random.bin");
    std::fs::write(&path, &random).expect("write random");
    std::fs::File::open(&path).and_then(|f| f.sync_all()).expect("fsync");
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    p.wait_synced(SETTLE);
    let after = link(&p, base);
    let (data, wire, frames) = report("random data", files, after);
    assert!(data >= RANDOM_BYTES as u64, "{data}");
    assert!(wire <= frames, "random data cost more on the wire ({wire}) than uncompressed ({frames})");

    check_copies(&share, &m.path().join("share"));
    check_copies(&lib, &m.path().join("lib"));
    assert!(std::fs::read(&path).expect("read random") == random);
    m.unmount();
    tool("e2fsck", ["-fn", &dev]);
    lo.detach();
    fuse.unmount();

    p.wait_synced(SETTLE);
    let out = p.ctl_ok(0, &["verify"]);
    assert!(out.stdout.contains("verify: 0 bytes out of sync"), "{}", out.describe());
    let compared = assert_data_equal(p.disk_path(0), p.disk_path(1), size);
    eprintln!("copies equal ({compared} bytes of data compared)");
}

/// One node with zstd, the other without: the link comes up uncompressed (no
/// refusal), both say "off", and both logs name the two settings.
#[test]
fn a_compression_mismatch_runs_uncompressed_with_a_warning_on_both_sides() {
    let mut p = Pair::create("compression-mismatch", &PairOpts::default());
    let text = std::fs::read_to_string(&p.config).expect("config");
    let own = p.dir.join("alpha.toml");
    std::fs::write(&own, text.replacen("[resource]\n", "[resource]\ncompression = \"zstd\"\n", 1))
        .expect("write");
    p.nodes[0].config = Some(own);
    p.start_node(0);
    p.start_node(1);
    p.wait_established();
    p.ctl_ok(0, &["primary"]);
    let data = p.dir.join("data.bin");
    std::fs::write(&data, "compressible ".repeat(1 << 18)).expect("write");
    tool("nbdcopy", ["--flush".to_string(), data.display().to_string(), p.uri(0)]);
    p.wait_synced(SETTLE);
    for n in 0..2 {
        let peer = p.peer(n);
        assert_eq!(peer["compression"], "off", "{peer}");
        assert_eq!(peer["sent_wire_bytes"], peer["sent_uncompressed_bytes"], "{peer}");
    }
    let (alpha, beta) = (p.daemon(0).log(), p.daemon(1).log());
    assert!(alpha.contains(r#"this node has compression = "zstd" but the peer `beta` has "off""#), "{alpha}");
    assert!(beta.contains(r#"this node has compression = "off" but the peer `alpha` has "zstd""#), "{beta}");
    let out = p.ctl_ok(0, &["verify"]);
    assert!(out.stdout.contains("verify: 0 bytes out of sync"), "{}", out.describe());
}
