//! Installing blockd like any daemon (issue 17): `scripts/install.sh` into a temporary
//! destdir puts every file at its fixed path; the Debian package built by
//! `scripts/deb.sh` (scripts/test.sh runs it after the release build) holds the same
//! files; every man page renders with `man -l` without warnings; every completion
//! script loads in its shell and completes a verb; `systemd-analyze verify` accepts
//! the units as installed.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blockd_tests::pair::binary;
use blockd_tests::tools::{Output, require, run_capture};
use blockd_tests::{TempDir, workspace_root};

/// The paths scripts and operators rely on (SPEC §8.2, issue 17), with their modes.
const FIXED: &[(&str, u32)] = &[
    ("usr/sbin/blockd", 0o755),
    ("usr/sbin/blockctl", 0o755),
    ("lib/systemd/system/blockd@.service", 0o644),
    ("lib/systemd/system/blockd-attach@.service", 0o644),
    ("usr/lib/ocf/resource.d/blockd/blockd", 0o755),
    ("usr/lib/ocf/resource.d/blockd/crm-fence-peer", 0o755),
    ("usr/lib/ocf/resource.d/blockd/crm-unfence-peer", 0o755),
    ("usr/share/man/man8/blockd.8", 0o644),
    ("usr/share/man/man8/blockctl.8", 0o644),
    ("usr/share/man/man5/blockd.toml.5", 0o644),
    ("usr/share/bash-completion/completions/blockctl", 0o644),
    ("usr/share/zsh/vendor-completions/_blockctl", 0o644),
    ("usr/share/fish/vendor_completions.d/blockctl.fish", 0o644),
    ("etc/blockd/r0.toml.example", 0o644),
];

const TIMEOUT: Duration = Duration::from_secs(120);

/// The cargo target dir holding the release binaries (and `debian/`).
fn target_dir() -> PathBuf {
    let blockd = binary("blockd");
    blockd.parent().and_then(Path::parent).expect("target/PROFILE/blockd").to_path_buf()
}

fn must(cmd: &mut Command) -> Output {
    let out = run_capture(cmd, TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    out
}

/// `scripts/install.sh --destdir DIR`: every file installed, relative path → mode.
fn install(dir: &TempDir) -> (PathBuf, BTreeMap<String, u32>) {
    let root = dir.join("root");
    must(
        Command::new(workspace_root().join("scripts/install.sh"))
            .arg("--destdir")
            .arg(&root)
            .arg("--prefix")
            .arg("/usr")
            .arg("--target-dir")
            .arg(target_dir()),
    );
    let mut files = BTreeMap::new();
    walk(&root, &root, &mut files);
    (root, files)
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, u32>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        let meta = std::fs::symlink_metadata(&path).expect("metadata");
        if meta.is_dir() {
            walk(root, &path, out);
        } else {
            let rel = path.strip_prefix(root).expect("under root").display().to_string();
            out.insert(rel, meta.permissions().mode() & 0o7777);
        }
    }
}

#[test]
fn install_puts_every_file_at_its_fixed_path() {
    let dir = TempDir::new("install");
    let (root, files) = install(&dir);
    for (path, mode) in FIXED {
        assert_eq!(files.get(*path), Some(mode), "{path} (mode {mode:o}) not installed; got {files:#?}");
    }
    // The installed binaries are the ones built, and run.
    let out = must(Command::new(root.join("usr/sbin/blockctl")).arg("--version"));
    assert!(out.stdout.starts_with("blockctl "), "{}", out.describe());
    // The unit starts the installed daemon on the resource's config.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/blockd@.service")).unwrap();
    assert!(unit.contains("\nType=notify\n"), "{unit}");
    assert!(unit.contains("\nExecStart=/usr/sbin/blockd run --config /etc/blockd/%i.toml\n"), "{unit}");
    // The example is an example, not a resource: `status` of all resources ignores it.
    assert!(!files.keys().any(|f| f.starts_with("etc/blockd/") && f.ends_with(".toml")));
}

#[test]
fn install_with_another_prefix_points_the_units_there() {
    let dir = TempDir::new("install-prefix");
    let root = dir.join("root");
    must(
        Command::new(workspace_root().join("scripts/install.sh"))
            .args(["--prefix", "/usr/local", "--target-dir"])
            .arg(target_dir())
            .arg("--destdir")
            .arg(&root),
    );
    let unit = std::fs::read_to_string(root.join("usr/local/lib/systemd/system/blockd@.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/sbin/blockd run"), "{unit}");
    assert!(root.join("usr/local/share/man/man8/blockctl.8").is_file());
    // OCF_ROOT does not move with the prefix.
    assert!(root.join("usr/lib/ocf/resource.d/blockd/blockd").is_file());
}

#[test]
fn deb_package_holds_the_files_install_puts() {
    let debian = target_dir().join("debian");
    let deb = std::fs::read_dir(&debian)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!("no .deb in {}: build it with scripts/deb.sh (scripts/test.sh does)", debian.display())
        });
    let listing = must(Command::new(require("dpkg-deb")).arg("-c").arg(&deb)).stdout;
    let mut packaged = BTreeMap::new();
    for line in listing.lines() {
        // -rwxr-xr-x 0/0   16950 2026-12-06 00:00 ./usr/lib/ocf/resource.d/blockd/blockd
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (perms, path) = (fields[0], fields[fields.len() - 1]);
        if let Some(bits) = perms.strip_prefix('-') {
            let mode = bits.chars().fold(0u32, |m, c| (m << 1) | u32::from(c != '-'));
            packaged.insert(path.trim_start_matches("./").to_string(), mode);
        }
    }
    let dir = TempDir::new("install-vs-deb");
    let (_, mut installed) = install(&dir);
    // cargo-deb adds the Debian copyright file; everything else is the same.
    installed.insert("usr/share/doc/blockd/copyright".into(), 0o644);
    assert_eq!(packaged, installed, "{} and install.sh differ", deb.display());
    let control = must(Command::new(require("dpkg-deb")).arg("-I").arg(&deb)).stdout;
    assert!(control.contains("Package: blockd"), "{control}");
    // No maintainer scripts: installing or removing never starts or stops a resource.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        assert!(!control.contains(script), "the package has a {script}:\n{control}");
    }
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = TempDir::new("man");
    let (root, _) = install(&dir);
    for (page, needle) in [
        ("usr/share/man/man8/blockd.8", "blockd run"),
        ("usr/share/man/man8/blockctl.8", "create-md"),
        ("usr/share/man/man5/blockd.toml.5", "resync-rate"),
    ] {
        let out = must(
            Command::new(require("man"))
                .args(["--warnings", "-E", "UTF-8", "-l"])
                .arg(root.join(page))
                .env("MANWIDTH", "80"),
        );
        assert!(out.stderr.trim().is_empty(), "{page}: warnings\n{}", out.describe());
        let text = plain(&out.stdout);
        assert!(text.contains("NAME") && text.contains(needle), "{page}\n{text}");
    }
}

/// Text without the overstrike (bold: `X\x08X`, underline: `_\x08X`) man prints
/// to a pipe.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

#[test]
fn completions_load_and_complete_in_each_shell() {
    let dir = TempDir::new("completions");
    let (root, _) = install(&dir);
    let share = root.join("usr/share");
    // bash: the function completes a verb from a prefix.
    let bash = share.join("bash-completion/completions/blockctl");
    let script = format!(
        "source '{}' && complete -p blockctl && COMP_WORDS=(blockctl sta) COMP_CWORD=1 \
         COMP_LINE='blockctl sta' COMP_POINT=12 && _blockctl blockctl sta blockctl && \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        bash.display()
    );
    let out = must(Command::new(require("bash")).args(["--norc", "--noprofile", "-c", &script]));
    assert!(out.stdout.lines().any(|l| l == "status"), "bash\n{}", out.describe());
    // zsh: the completion function registers itself for blockctl under compinit.
    let zsh = share.join("zsh/vendor-completions");
    let script = format!(
        "fpath=('{}' $fpath); autoload -Uz compinit && compinit -u -D && print -r -- ${{_comps[blockctl]}}",
        zsh.display()
    );
    let out = must(Command::new(require("zsh")).args(["-f", "-c", &script]).env("HOME", dir.path()));
    assert_eq!(out.stdout.trim(), "_blockctl", "zsh\n{}", out.describe());
    // fish: completes verbs of a partial command line.
    let fish = share.join("fish/vendor_completions.d/blockctl.fish");
    let script = format!("source '{}'; complete -C'blockctl sta'", fish.display());
    let out =
        must(Command::new(require("fish")).args(["--no-config", "-c", &script]).env("HOME", dir.path()));
    assert!(out.stdout.lines().any(|l| l.starts_with("status")), "fish\n{}", out.describe());
}

#[test]
fn systemd_analyze_verifies_the_installed_units() {
    let dir = TempDir::new("units");
    let (root, _) = install(&dir);
    // verify --root resolves the units' dependencies and executables inside the
    // root: give it the host's own units beside the installed files.
    let units = root.join("lib/systemd/system");
    must(Command::new("cp").arg("-an").arg("/lib/systemd/system/.").arg(&units));
    let out = must(
        Command::new(require("systemd-analyze"))
            .args(["verify", "--man=no", "--root"])
            .arg(&root)
            .args(["blockd@r0.service", "blockd-attach@nbd0.service"]),
    );
    // Unknown keys and bad values are only warnings to verify: any output fails.
    assert!(out.stderr.trim().is_empty() && out.stdout.trim().is_empty(), "{}", out.describe());
}
