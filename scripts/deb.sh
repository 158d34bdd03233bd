#!/usr/bin/env bash
# Builds the Debian package target/debian/blockd_VERSION-1_ARCH.deb with cargo-deb,
# from the release binaries (`cargo build --release`, which scripts/test.sh runs
# first) and the man pages and completions blockd-docgen renders next to them.
# The package's files are the ones scripts/install.sh --prefix /usr installs.
# Installs cargo-deb (crates.io) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb"
    cargo install --locked --quiet cargo-deb --version 3.8.0
fi
for b in blockd blockctl blockd-docgen; do
    [[ -x "$target/release/$b" ]] || { echo "deb.sh: $target/release/$b missing: cargo build --release first" >&2; exit 1; }
done
"$target/release/blockd-docgen" "$target/release/blockd-docs"
cargo deb -p blockd --no-build --strip --quiet "$@"
