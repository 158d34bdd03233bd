#!/usr/bin/env bash
# The main job: builds blockd and serves a 1 GiB sparse file as a standalone Primary
# on loopback, printing the NBD URI. Ctrl-C stops it cleanly (flush, exit 0).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd
dir=${BLOCKD_DEMO_DIR:-/tmp/blockd-demo}
port=${BLOCKD_DEMO_PORT:-10809}
mkdir -p "$dir"
[ -e "$dir/r0-alpha.img" ] || truncate -s 1G "$dir/r0-alpha.img"
cat > "$dir/r0.toml" <<TOML
[resource]
name = "r0"
protocol = "C"

[[node]]
name = "alpha"
replication = "127.0.0.1:7789"
nbd = ["127.0.0.1:$port", "unix:$dir/nbd.sock"]
disk = "$dir/r0-alpha.img"
meta = "internal"
control = "$dir/alpha.ctl"
TOML
echo "serving $dir/r0-alpha.img (sparse, 1 GiB)"
echo "NBD URI: nbd://127.0.0.1:$port/r0   (also nbd+unix:///r0?socket=$dir/nbd.sock)"
echo "try:     nbdinfo nbd://127.0.0.1:$port/r0"
exec ./target/release/blockd run --config "$dir/r0.toml" --node alpha
