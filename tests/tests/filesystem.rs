//! A real filesystem on the export: nbdfuse → loop device → mkfs.ext4 →
//! mount → files → umount → e2fsck → restart the server → files intact.
//! Needs root, /dev/fuse and loop devices; every layer is undone by a guard
//! even when the test fails.

use std::io::Write;
use std::path::Path;

use blockd_tests::guards::{FuseMount, LoopDev, Mount, require_fs_privileges};
use blockd_tests::*;
use rand::{RngCore, SeedableRng};

/// (relative path, content) of the files the test writes and checks.
fn files() -> Vec<(String, Vec<u8>)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut v = vec![
        ("empty".to_string(), Vec::new()),
        ("one-byte".to_string(), b"x".to_vec()),
        ("hello.txt".to_string(), b"hello from blockd-tests\n".to_vec()),
    ];
    for (name, len) in [("4k.bin", 4096usize), ("odd.bin", (1 << 20) + 7), ("big.bin", 24 << 20)] {
        let mut b = vec![0u8; len];
        rng.fill_bytes(&mut b);
        v.push((name.to_string(), b));
    }
    for i in 0..200 {
        v.push((
            format!("dir/sub{}/file{i}", i % 10),
            format!("small file {i}\n").repeat(i + 1).into_bytes(),
        ));
    }
    v
}

fn write_files(root: &Path) {
    for (name, data) in files() {
        let p = root.join(&name);
        std::fs::create_dir_all(p.parent().unwrap()).expect("mkdir");
        let mut f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
    }
    // sync(1)
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

fn check_files(root: &Path) {
    let want = files();
    for (name, data) in &want {
        let p = root.join(name);
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(got == *data, "{name}: content differs ({} vs {} bytes)", got.len(), data.len());
    }
    let n = walk(root);
    // files + lost+found's absence from the list: count regular files only.
    assert_eq!(n, want.len(), "unexpected number of files");
}

fn walk(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).expect("readdir") {
        let e = e.expect("entry");
        let t = e.file_type().expect("type");
        if t.is_dir() {
            if e.file_name() != "lost+found" {
                n += walk(&e.path());
            }
        } else {
            n += 1;
        }
    }
    n
}

engine_tests! {
    fn ext4_on_nbdfuse_loop_survives_restart(srv = Opts::new().size(256 * MIB)) {
        require_fs_privileges();
        let mut srv = srv;
        for t in ["mkfs.ext4", "e2fsck", "losetup", "mount", "umount"] {
            require(t);
        }
        let fuse_dir = srv.path("fuse");
        let mnt = srv.path("mnt");
        {
            let fuse = FuseMount::mount(&fuse_dir, &srv.uri(), &srv.path("nbdfuse1.log"), srv.size());
            let lo = LoopDev::attach(&fuse.file());
            let dev = lo.dev().to_str().unwrap().to_string();
            tool("mkfs.ext4", ["-q", "-F", &dev]);
            let m = Mount::new(lo.dev(), &mnt, "ext4");
            write_files(m.path());
            check_files(m.path());
            m.unmount();
            tool("e2fsck", ["-fn", &dev]);
            lo.detach();
            fuse.unmount();
        }

        srv.daemon.restart();

        let fuse = FuseMount::mount(&fuse_dir, &srv.uri(), &srv.path("nbdfuse2.log"), srv.size());
        let lo = LoopDev::attach(&fuse.file());
        let dev = lo.dev().to_str().unwrap().to_string();
        tool("e2fsck", ["-fn", &dev]);
        let m = Mount::new(lo.dev(), &mnt, "ext4");
        check_files(m.path());
        // Change something after the restart too, and check it is clean.
        std::fs::remove_file(m.path().join("big.bin")).expect("rm");
        write_files(m.path());
        check_files(m.path());
        m.unmount();
        tool("e2fsck", ["-fn", &dev]);
        lo.detach();
        fuse.unmount();
    }
}
