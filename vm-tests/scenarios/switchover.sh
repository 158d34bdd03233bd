# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# switchover: planned role changes under a mounted ext4 and an fsyncing writer, with
# nothing killed: `secondary --force` on the Primary (it disconnects the kernel
# client), `primary` on the other; the device follows by itself each way (alpha →
# beta → alpha) and the writer goes on; then a clean e2fsck and every file's sha256.
# shellcheck source=lib.sh
. /scenarios/lib.sh

# switch OLD NEW
switch() {
    local t0 n
    t0=$(now)
    must ctl "$1" secondary --force
    must ctl "$2" primary
    n=$(written)
    wait_until "20 more files written after $2's promotion" 60 written_at_least $((n + 20))
    STALLS="$STALLS $(awk -v k="$t0" '$1 < k {last = $1} $1 >= k && !first {first = $1}
        END {if (first && last) printf "%.1f", first - last; else print "?"}' "$DIR/wtimes")s"
}

pair_up
attach --timeout-secs 10 --dead-conn-timeout-secs 120
mkfs_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
start_writer
wait_until "the writer wrote 20 files" 60 written_at_least 20
STALLS=
switch alpha beta
switch beta alpha
stop_writer
verify_fs
detach
pair_down
note "writer stalled$STALLS; $(written) files"
