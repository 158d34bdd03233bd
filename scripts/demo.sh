#!/usr/bin/env bash
# The main job: a replicated pair on this machine. Builds blockd, creates two sparse
# 1 GiB backing files, starts nodes alpha and beta on loopback (protocol C), makes
# alpha Primary, and prints the NBD URI and both nodes' status. It stays in the
# foreground; Ctrl-C stops both nodes cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p blockd -p blockctl
bin=$PWD/target/release
dir=${BLOCKD_DEMO_DIR:-/tmp/blockd-demo}
mkdir -p "$dir"
cat > "$dir/r0.toml" <<TOML
[resource]
name = "r0"
protocol = "C"

[[node]]
name = "alpha"
replication = "127.0.0.1:7789"
nbd = ["127.0.0.1:10809", "unix:$dir/alpha.nbd"]
disk = "$dir/r0-alpha.img"
meta = "internal"
control = "$dir/alpha.ctl"

[[node]]
name = "beta"
replication = "127.0.0.1:7790"
nbd = ["127.0.0.1:10810", "unix:$dir/beta.nbd"]
disk = "$dir/r0-beta.img"
meta = "internal"
control = "$dir/beta.ctl"
TOML
ctl() { "$bin/blockctl" --config "$dir/r0.toml" --node "$@"; }
if [ ! -e "$dir/r0-alpha.img" ] || [ ! -e "$dir/r0-beta.img" ]; then
    rm -f "$dir"/r0-*.img
    truncate -s 1G "$dir/r0-alpha.img" "$dir/r0-beta.img"
    # Both files are empty, hence identical: no initial full sync needed.
    ctl alpha create-md --clear-bitmap
    ctl beta create-md --clear-bitmap
fi
stop() { ctl alpha down || true; ctl beta down || true; }
trap stop EXIT
ctl alpha up --log "$dir/alpha.log"
ctl beta up --log "$dir/beta.log"
for _ in $(seq 1 200); do
    if ctl alpha status --json | grep -q '"replication":"Established"'; then break; fi
    sleep 0.1
done
ctl alpha primary
echo
echo "NBD URI: nbd://127.0.0.1:10809/r0   (also nbd+unix:///r0?socket=$dir/alpha.nbd)"
echo "try:     nbdinfo nbd://127.0.0.1:10809/r0"
echo
ctl alpha status
ctl beta status
echo
echo "running; Ctrl-C stops both nodes (logs: $dir/alpha.log, $dir/beta.log)"
trap 'exit 0' INT TERM
while true; do sleep 3600 & wait $!; done
