# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# detach: detach while idle works; while the filesystem is mounted and being written,
# `blockctl detach` is refused (exit 1, says why), the device stays attached and the
# filesystem intact; while a raw writer holds the device open, plain detach is refused
# too and `detach --force` disconnects it (the writer gets errors, the device is gone);
# with no Primary left, `detach --force` ends a write waiting for a reconnect.
# shellcheck source=lib.sh
. /scenarios/lib.sh

# Some process other than the attach resident has $NBD open.
holder_open() {
    local p
    for p in /proc/[0-9]*/fd/*; do
        case $p in "/proc/$RESIDENT/"*) continue ;; esac
        [ "$(readlink "$p" 2>/dev/null)" = "$NBD" ] && return 0
    done
    return 1
}

pair_up

# Idle.
attach
detach

# Mounted, with a writer.
attach
mkfs_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
write_files 8
start_writer
wait_until "the writer wrote 10 files" 60 written_at_least 10
resident=$RESIDENT
refused blockctl detach "$NBD"
says 'mount|held|busy|in use|open' "detach of a mounted device"
if [ "$(dev_pid "$NBD")" != "$resident" ]; then
    fail "$NBD no longer attached to resident $resident after a refused detach"
fi
[ -d "/proc/$resident" ] || fail "the resident (pid $resident) exited after a refused detach"
n=$(written)
wait_until "the writer goes on after the refused detach" 30 written_at_least $((n + 10))
stop_writer
must umount "$MNT"
fsck_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
verify_sums "$DIR/sums"
verify_sums "$DIR/wlog"
must umount "$MNT"

# A raw writer: fd 3 keeps the device open throughout, dd writes through it again
# and again until the device fails it.
(
    exec 3>"$NBD"
    while dd if=/dev/zero of="$NBD" bs=65536 count=16 conv=fsync 2>/dev/null; do :; done
    echo "raw writer stopped: dd failed" >"$DIR/raw.out"
) &
RAW=$!
BG_PIDS="$BG_PIDS $RAW"
wait_until "the raw writer has the device open" 10 holder_open
refused blockctl detach "$NBD"
says 'open|held|busy|in use' "detach of a device open by a raw writer"
[ -n "$(dev_pid "$NBD")" ] || fail "$NBD detached by a refused detach"
detach --force
wait_until "the raw writer failed and exited after detach --force" 30 not_running "$RAW"

# No Primary any more: alpha's blockd killed, beta left Secondary. A write waits for
# a reconnect that cannot come (dead-conn timeout 120 s); detach --force ends the
# wait, the write fails. The device is opened once first: the first open after
# attach rescans partitions (reads), and a writer stuck in that open() holds no
# descriptor yet. detach sees such a writer only if its read was already sent
# when the link died (`inflight`); one still waiting for a reconnect is not
# counted by the kernel, so that case is not asserted here.
attach --timeout-secs 10 --dead-conn-timeout-secs 120
must dd if="$NBD" of=/dev/null bs=4096 count=1
kill -9 "$(field alpha .pid)"
(
    rc=0
    dd if=/dev/zero of="$NBD" bs=65536 count=16 conv=fsync 2>"$DIR/stuck.err" || rc=$?
    echo "$rc" >"$DIR/stuck.rc"
) &
STUCK=$!
BG_PIDS="$BG_PIDS $STUCK"
sleep 2 # not a synchronization: the write must still be waiting after this long
[ ! -e "$DIR/stuck.rc" ] || fail "a write with no Primary completed (exit $(cat "$DIR/stuck.rc"))"
refused blockctl detach "$NBD"
says 'open in' "detach of a device whose writer waits for a Primary"
t0=$(now)
detach --force
says 'in use' "detach --force of a device with a waiting writer (its message)"
wait_until "the waiting write ended after detach --force" 30 test -e "$DIR/stuck.rc"
[ "$(cat "$DIR/stuck.rc")" != 0 ] || fail "the write waiting for a Primary succeeded after detach --force"
log "the waiting write failed $(awk "BEGIN {print $(now) - $t0}")s after detach --force: $(tail -n1 "$DIR/stuck.err")"
pair_down
