//! Is an NBD device in use? `detach` refuses (without `--force`) while the device or
//! one of its partitions is mounted, held by another block device (dm, md), open in
//! any process but the attach resident, or has requests in flight — the checks
//! `umount`, `fuser` and `lsblk` would make, read straight from /proc and /sys.
//!
//! Not seen: a process still inside `open()` (the first open after attach reads the
//! partition table) holds no descriptor yet; its read shows in `inflight` only once
//! the kernel has sent it, not while it waits for a reconnect.

use std::fs;
use std::path::Path;

/// How a device is in use: "mounted on /mnt", "held by dm-0", "open in pid 7 (dd)".
pub fn in_use(index: u32, resident_pid: Option<u32>) -> Option<String> {
    let name = format!("nbd{index}");
    if let Some(mounts) = mounted(&name) {
        return Some(format!("mounted on {mounts}"));
    }
    let holders = holders(&name);
    if !holders.is_empty() {
        return Some(format!("held by {}", holders.join(", ")));
    }
    let users = openers(&name, resident_pid);
    if !users.is_empty() {
        return Some(format!("open in {}", users.join(", ")));
    }
    // `inflight`: "READS WRITES" outstanding in the block layer.
    let inflight =
        fs::read_to_string(Path::new("/sys/block").join(&name).join("inflight")).unwrap_or_default();
    let requests: u64 = inflight.split_whitespace().filter_map(|n| n.parse::<u64>().ok()).sum();
    if requests > 0 {
        return Some(format!("{requests} request(s) in flight"));
    }
    None
}

/// `(major, minor)` of the device and each of its partitions.
fn dev_numbers(name: &str) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut add = |dev_file: &Path| {
        if let Ok(s) = fs::read_to_string(dev_file)
            && let Some((ma, mi)) = s.trim().split_once(':')
            && let (Ok(ma), Ok(mi)) = (ma.parse(), mi.parse())
        {
            out.push((ma, mi));
        }
    };
    let base = Path::new("/sys/block").join(name);
    add(&base.join("dev"));
    if let Ok(entries) = fs::read_dir(&base) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(name) {
                add(&e.path().join("dev"));
            }
        }
    }
    out
}

/// Mount points (comma-separated) of the device or its partitions, from mountinfo
/// (field 3 is `major:minor`, field 5 the mount point).
fn mounted(name: &str) -> Option<String> {
    let numbers = dev_numbers(name);
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let points: Vec<&str> = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (ma, mi) = f.get(2)?.split_once(':')?;
            let n = (ma.parse().ok()?, mi.parse().ok()?);
            numbers.contains(&n).then(|| f.get(4).copied()).flatten()
        })
        .collect();
    (!points.is_empty()).then(|| points.join(", "))
}

fn holders(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let base = Path::new("/sys/block").join(name);
    let mut dirs = vec![base.join("holders")];
    if let Ok(entries) = fs::read_dir(&base) {
        dirs.extend(
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(name))
                .map(|e| e.path().join("holders")),
        );
    }
    for d in dirs {
        if let Ok(entries) = fs::read_dir(d) {
            out.extend(entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()));
        }
    }
    out
}

/// `pid (comm)` of processes with the device or a partition open, except ours and
/// the resident's.
fn openers(name: &str, resident_pid: Option<u32>) -> Vec<String> {
    let me = std::process::id();
    let dev = format!("/dev/{name}");
    let mut out = Vec::new();
    let Ok(procs) = fs::read_dir("/proc") else { return out };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == me || Some(pid) == resident_pid {
            continue;
        }
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            fs::read_link(fd.path()).is_ok_and(|target| {
                let t = target.to_string_lossy();
                t == dev || t.strip_prefix(dev.as_str()).is_some_and(|rest| rest.starts_with('p'))
            })
        });
        if holds {
            let comm = fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}
