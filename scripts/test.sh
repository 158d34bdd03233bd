#!/usr/bin/env bash
# Runs every check and test of the project on a fresh machine of this kind:
# installs the external tools the tests drive, builds once (release), then runs
# formatting, lints, unit tests and the integration suites in one cargo invocation,
# then every fuzz target briefly (scripts/fuzz.sh), and last the qemu guest tests of
# the kernel NBD client (vm-tests/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: real NBD clients and servers written by others, and
# the filesystem tools. qemu-utils (qemu-io, qemu-img) is preinstalled on this machine
# kind; installing it from Debian is the fallback.
need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdfuse >/dev/null || need+=(libnbd-bin)
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v losetup >/dev/null || need+=(mount)
command -v ip >/dev/null || need+=(iproute2)
# peer_tls.rs: a packet capture of the replication port (no plaintext under TLS).
command -v tcpdump >/dev/null || need+=(tcpdump)
# gen_certs.rs reads the certificates blockctl gen-certs made.
command -v openssl >/dev/null || need+=(openssl)
# The Pacemaker agent's tests (tests/tests/ocf.rs): ocf-tester and ocf-shellfuncs,
# xmllint (meta-data against ra-api-1.dtd), cibadmin/crm_attribute on a CIB file.
command -v ocf-tester >/dev/null || need+=(resource-agents)
command -v xmllint >/dev/null || need+=(libxml2-utils)
command -v cibadmin >/dev/null || need+=(pacemaker-cli-utils)
# pacemaker.rs: a real two-node Corosync + Pacemaker cluster in namespaces. The
# package scripts do not start services here (/usr/sbin/policy-rc.d exits 101).
command -v corosync >/dev/null || need+=(corosync)
command -v pacemakerd >/dev/null || need+=(pacemaker)
command -v crm >/dev/null || need+=(crmsh)
# Packaging and operations (tests/tests/{packaging,systemd,monitoring}.rs): promtool
# (Debian has it only in the full prometheus package, ~19 MB; the service is not
# started), the shells the completions are loaded in, man to render the pages,
# systemd-analyze to verify the units (PID 1 need not be systemd).
command -v promtool >/dev/null || need+=(prometheus)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
command -v man >/dev/null || need+=(man-db)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v dpkg-deb >/dev/null || need+=(dpkg)
if ((${#need[@]})); then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
# The fuzz crate is a workspace of its own (fuzz/Cargo.toml).
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -q -- -D warnings
echo "== build (release)"
cargo build --workspace --release -q
# The Debian package from those binaries (installs cargo-deb from crates.io when
# missing); tests/tests/packaging.rs checks its contents.
echo "== package (cargo deb)"
./scripts/deb.sh
echo "== tests"
# Unit tests and integration suites (real blockd processes) in one run; the
# integration tests find target/release/blockd built above.
cargo test --workspace --release -q -- --test-threads "${BLOCKD_TEST_THREADS:-4}"
# The deterministic simulator of a pair (the real replication core and metadata
# code, simulated disks, network, crashes, clients and operators): 100 seeds of
# 20,000 steps each, 2,000,000 steps; it prints the seed and the broken invariant of
# any failure and exits 1.
echo "== simulator"
./target/release/blockd-sim --seeds 100 --steps 20000
# Every parser of untrusted bytes under libFuzzer, briefly (fuzz/README.md):
# installs cargo-fuzz if missing, builds the targets once, runs each for
# BLOCKD_FUZZ_SECONDS (default 15); any crash fails with the reproducer's path.
echo "== fuzz"
./scripts/fuzz.sh
# The kernel NBD client (blockctl attach/detach, failover) in a qemu guest: the
# host kernel has no nbd module. Uses the release binaries built above.
echo "== vm-tests"
./vm-tests/run
