# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# (busybox ash; dash is the closest shell shellcheck knows. SC2119: attach and
# detach default to $NBD when called without arguments.)
# Helpers sourced by every scenario (busybox sh, inside the guest).
#
# From /init: VMTEST_NAME, VMTEST_DIR (this scenario's directory on tmpfs) and
# VMTEST_INDEX (1-based). The index picks this scenario's /dev/nbdN and TCP ports, so
# a scenario that failed and left a device or a socket behind cannot disturb the next.
#
# Contract with /init: exit 0 = pass; `fail REASON` writes the one-line reason and
# exits 1; `note TEXT` adds TEXT to the PASS line. Every command that matters is
# logged ("[hh:mm:ss] + cmd") with its output indented; /init prints the log when the
# scenario fails.

set -eu

NAME=$VMTEST_NAME
DIR=$VMTEST_DIR
NBD=/dev/nbd$((VMTEST_INDEX - 1))
SYS=/sys/block/nbd$((VMTEST_INDEX - 1))
# A second device for the scenarios that need one (nbds_max is 16).
NBD2=/dev/nbd$((VMTEST_INDEX + 7))
CFG=$DIR/r0.toml
MNT=/mnt/$NAME
PORT=$((12000 + VMTEST_INDEX * 10))
DISK_SIZE=${DISK_SIZE:-256M}
NODE_PIDS=
BG_PIDS=

mkdir -p "$DIR" "$MNT"
rm -f "$DIR/reason" "$DIR/note"

log() { echo "[$(date +%H:%M:%S)] $*"; }

fail() {
    echo "$*" >"$DIR/reason"
    log "FAIL: $*"
    exit 1
}

note() { echo "$*" >>"$DIR/note"; }

# Seconds since boot: `now` with hundredths, `secs` whole.
now() {
    read -r up _ </proc/uptime
    echo "$up"
}
secs() {
    read -r up _ </proc/uptime
    echo "${up%.*}"
}

# must CMD...: runs CMD (logged, output indented); a non-zero exit fails the scenario.
# Leaves the output in OUT.
must() {
    log "+ $*"
    set +e
    OUT=$("$@" 2>&1)
    RC=$?
    set -e
    [ -z "$OUT" ] || printf '%s\n' "$OUT" | sed 's/^/    /'
    [ "$RC" = 0 ] || fail "\`$*\` exited $RC: $(printf '%s\n' "$OUT" | tail -n1)"
}

# refused CMD...: CMD must exit 1 (refused) with a message on stderr/stdout. OUT
# holds the message.
refused() {
    log "+ $*   (must be refused)"
    set +e
    OUT=$("$@" 2>&1)
    RC=$?
    set -e
    [ -z "$OUT" ] || printf '%s\n' "$OUT" | sed 's/^/    /'
    [ "$RC" = 1 ] || fail "\`$*\` exited $RC, expected 1 (refused): $(printf '%s\n' "$OUT" | tail -n1)"
    [ -n "$OUT" ] || fail "\`$*\` was refused without a message"
}

# says PATTERN WHAT: the last command's output (OUT) matches the extended regex
# PATTERN (case-insensitive), else the refusal did not say why.
says() {
    printf '%s\n' "$OUT" | grep -qiE "$1" ||
        fail "$2: the message does not say why (expected /$1/): $(printf '%s' "$OUT" | tr '\n' ' ')"
}

# verify_fs: after the writer: unmount, a clean e2fsck, mount again, every logged
# file's sha256, unmount.
verify_fs() {
    must umount "$MNT"
    fsck_ ext4 "$NBD"
    must mount -t ext4 "$NBD" "$MNT"
    verify_sums "$DIR/wlog"
    must umount "$MNT"
}

# wait_until DESC SECS CMD...: polls CMD (every 0.1 s) until it succeeds; fails the
# scenario with DESC after SECS seconds.
wait_until() {
    local desc="$1" limit="$2" deadline
    shift 2
    deadline=$(($(secs) + limit))
    until "$@" >/dev/null 2>&1; do
        [ "$(secs)" -lt "$deadline" ] || fail "$desc: not within ${limit}s"
        usleep 100000
    done
}

# ------------------------------------------------------------------ the pair

# write_config FILE RESOURCE: alpha and beta on loopback, disks on tmpfs.
write_config() {
    cat >"$1" <<EOF
[resource]
name = "$2"
protocol = "C"

[[node]]
name = "alpha"
replication = "127.0.0.1:$((PORT + 1))"
nbd = "127.0.0.1:$((PORT + 3))"
disk = "$DIR/alpha.img"
meta = "internal"
control = "$DIR/alpha.sock"

[[node]]
name = "beta"
replication = "127.0.0.1:$((PORT + 2))"
nbd = "127.0.0.1:$((PORT + 4))"
disk = "$DIR/beta.img"
meta = "internal"
control = "$DIR/beta.sock"
EOF
}

ctl() {
    local node="$1"
    shift
    blockctl --config "$CFG" --node "$node" "$@"
}

# field NODE JQ-FILTER: one field of `status --json`.
field() { ctl "$1" status --json | jq -r "$2"; }

running() { ctl "$1" status --json >/dev/null 2>&1; }

connected() {
    [ "$(field "$1" '.disk + " " + .peers[0].replication + " " + .peers[0].disk')" = \
        "UpToDate Established UpToDate" ]
}

# Fresh images and metadata (identical empty disks: no initial sync).
pair_create() {
    write_config "$CFG" r0
    rm -f "$DIR/alpha.img" "$DIR/beta.img"
    truncate -s "$DISK_SIZE" "$DIR/alpha.img" "$DIR/beta.img"
    must ctl alpha create-md --clear-bitmap
    must ctl beta create-md --clear-bitmap
}

node_up() {
    must ctl "$1" up --log "$DIR/$1.log"
    NODE_PIDS="$NODE_PIDS $(field "$1" .pid)"
}

# Both nodes up and connected, alpha Primary.
pair_up() {
    pair_create
    node_up alpha
    node_up beta
    wait_until "alpha and beta connected and UpToDate" 30 connected alpha
    must ctl alpha primary
    [ "$(field alpha .role)" = Primary ] || fail "alpha is not Primary after \`primary\`"
}

# Stops whichever nodes still run.
pair_down() {
    local n
    for n in alpha beta; do
        if running "$n"; then must ctl "$n" down; fi
    done
}

# ------------------------------------------------------------------ attach

# dev_pid DEVICE: the pid in /sys/block/nbdN/pid; empty when the device is not
# connected (the kernel removes the file then).
dev_pid() { cat "/sys/block/${1#/dev/}/pid" 2>/dev/null || true; }

# attach [DEVICE] [OPTIONS...]: `blockctl attach r0 DEVICE` (default $NBD); checks
# the device is usable on return.
attach() {
    local dev=$NBD
    case ${1:-} in /dev/*)
        dev=$1
        shift
        ;;
    esac
    must blockctl --config "$CFG" attach r0 "$dev" --log "$DIR/attach-${dev#/dev/}.log" "$@"
    local sys="/sys/block/${dev#/dev/}"
    [ -n "$(dev_pid "$dev")" ] || fail "$dev: no $sys/pid after attach returned"
    [ "$(cat "$sys/size")" -gt 0 ] || fail "$dev: size 0 after attach returned"
    RESIDENT=$(cat "$sys/pid")
    log "  $dev attached: resident pid $RESIDENT, $(($(cat "$sys/size") / 2048)) MiB," \
        "block $(cat "$sys/queue/logical_block_size"), write_cache '$(cat "$sys/queue/write_cache")'," \
        "fua $(cat "$sys/queue/fua"), discard_max $(cat "$sys/queue/discard_max_bytes")," \
        "write_zeroes_max $(cat "$sys/queue/write_zeroes_max_bytes")"
}

gone() {
    local sys="/sys/block/${1#/dev/}"
    { [ -z "$(dev_pid "$1")" ] || [ "$(cat "$sys/size")" = 0 ]; } && not_running "$2"
}

# detached DEVICE RESIDENT: the device is disconnected and the resident has exited.
detached() {
    wait_until "$1 disconnected and its resident (pid $2) gone after detach" 15 gone "$1" "$2"
}

# detach [DEVICE] [OPTIONS...]
# shellcheck disable=SC2120
detach() {
    local dev=$NBD
    case ${1:-} in /dev/*)
        dev=$1
        shift
        ;;
    esac
    local resident
    resident=$(dev_pid "$dev")
    must blockctl detach "$dev" "$@"
    detached "$dev" "$resident"
}

# The kernel took the export's flags: FLUSH (write cache), FUA, TRIM.
check_queue() {
    local v
    v=$(cat "$SYS/queue/write_cache")
    [ "$v" = "write back" ] || fail "queue/write_cache is '$v', expected 'write back' (FLUSH not taken)"
    v=$(cat "$SYS/queue/fua")
    [ "$v" = 1 ] || fail "queue/fua is $v, expected 1"
    v=$(cat "$SYS/queue/discard_max_bytes")
    [ "$v" -gt 0 ] || fail "queue/discard_max_bytes is $v, expected > 0 (TRIM not taken)"
}

# check_oom PID WHAT: the process is exempt from the OOM killer.
check_oom() {
    local v
    v=$(cat "/proc/$1/oom_score_adj")
    [ "$v" = -1000 ] || fail "$2 (pid $1): oom_score_adj is $v, expected -1000"
}

# ------------------------------------------------------------------ filesystems

mkfs_() {
    case $1 in
    ext4) must mkfs.ext4 -q -F "$2" ;;
    xfs) must mkfs.xfs -q -f "$2" ;;
    esac
}

# fsck_ FS DEVICE: read-only check, must be clean.
fsck_() {
    case $1 in
    ext4) must e2fsck -fn "$2" ;;
    xfs) must xfs_repair -n "$2" ;;
    esac
}

mounted() { grep -q " $MNT " /proc/mounts; }

# write_files COUNT: files of 4 KiB .. 4 MiB of random data under $MNT/files, their
# sha256 in $DIR/sums (on tmpfs).
write_files() {
    local i=0 size
    mkdir -p "$MNT/files"
    log "writing $1 files under $MNT/files"
    while [ "$i" -lt "$1" ]; do
        size=$((4096 << (i % 11)))
        head -c "$size" /dev/urandom >"$DIR/buf"
        echo "$(sha256sum <"$DIR/buf" | cut -d' ' -f1)  $MNT/files/f$i" >>"$DIR/sums"
        cp "$DIR/buf" "$MNT/files/f$i"
        i=$((i + 1))
    done
}

# verify_sums FILE: every "sha256  path" line of FILE matches.
verify_sums() {
    local out n
    n=$(wc -l <"$1")
    log "+ sha256sum -c $1   ($n files)"
    out=$(sha256sum -c "$1" 2>&1) ||
        fail "sha256 mismatch after remount: $(printf '%s\n' "$out" | grep -v ': OK$' | head -n3 | tr '\n' ' ')"
}

# A background writer: files of 64 KiB random data under $MNT/w, each written with
# dd conv=fsync and its directory fsynced (busybox `sync DIR` is fsync(DIR)); only
# then is "sha256  path" appended to $DIR/wlog and the completion time (seconds
# since boot) to $DIR/wtimes. The first error is written to $DIR/writer.err and
# stops it. `touch $DIR/stop` ends it.
writer() {
    local i=0 sum
    mkdir -p "$MNT/w"
    rm -f "$DIR/stop" "$DIR/writer.err" "$DIR/wlog" "$DIR/wtimes"
    touch "$DIR/wlog" "$DIR/wtimes"
    while [ ! -e "$DIR/stop" ]; do
        i=$((i + 1))
        head -c 65536 /dev/urandom >"$DIR/wbuf"
        sum=$(sha256sum <"$DIR/wbuf" | cut -d' ' -f1)
        if ! dd if="$DIR/wbuf" of="$MNT/w/f$i" bs=65536 conv=fsync 2>"$DIR/dd.err"; then
            echo "f$i: dd: $(tail -n1 "$DIR/dd.err")" >"$DIR/writer.err"
            return 1
        fi
        if ! sync "$MNT/w" 2>"$DIR/dd.err"; then
            echo "f$i: fsync of $MNT/w: $(tail -n1 "$DIR/dd.err")" >"$DIR/writer.err"
            return 1
        fi
        echo "$sum  $MNT/w/f$i" >>"$DIR/wlog"
        now >>"$DIR/wtimes"
    done
}

start_writer() {
    writer &
    WRITER=$!
    BG_PIDS="$BG_PIDS $WRITER"
    log "writer started (pid $WRITER)"
}

written() { wc -l <"$DIR/wlog"; }

# written_at_least N: the writer has logged N files (and has not failed).
written_at_least() {
    [ ! -s "$DIR/writer.err" ] || fail "the writer failed: $(cat "$DIR/writer.err")"
    [ "$(written)" -ge "$1" ]
}

stop_writer() {
    touch "$DIR/stop"
    wait_until "the writer stopped" 60 not_running "$WRITER"
    [ ! -s "$DIR/writer.err" ] || fail "the writer failed: $(cat "$DIR/writer.err")"
    log "writer stopped after $(written) files"
}

# not_running PID: gone, or a zombie (a killed daemon is an orphan that /init reaps
# only when its own loop comes round).
not_running() {
    local st
    [ -e "/proc/$1/stat" ] || return 0
    read -r _ _ st _ <"/proc/$1/stat" 2>/dev/null || return 0
    [ "$st" = Z ]
}

# fs_roundtrip FS [ATTACH OPTIONS...]: on the attached $NBD: mkfs, mount, files of
# known sha256, sync, fstrim, umount, detach; attach again, read-only fsck must be
# clean, mount, every file's sha256 again, umount, detach.
fs_roundtrip() {
    local fs="$1"
    shift
    mkfs_ "$fs" "$NBD"
    must mount -t "$fs" "$NBD" "$MNT"
    write_files 22
    must sync
    must fstrim -v "$MNT"
    must umount "$MNT"
    detach
    attach "$@"
    fsck_ "$fs" "$NBD"
    must mount -t "$fs" "$NBD" "$MNT"
    verify_sums "$DIR/sums"
    must umount "$MNT"
    detach
}

# ------------------------------------------------------------------ cleanup

# Whatever happened: stop background jobs, unmount, detach, stop the nodes.
cleanup() {
    local rc=$? p n d
    trap - EXIT
    set +e
    for p in $BG_PIDS; do kill "$p" 2>/dev/null; done
    touch "$DIR/stop"
    if mounted; then timeout 30 umount "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    for d in "$NBD" "$NBD2"; do
        [ -n "$(dev_pid "$d")" ] && timeout 30 blockctl detach --force "$d" >/dev/null 2>&1
    done
    for n in alpha beta; do
        timeout 30 blockctl --config "$CFG" --node "$n" down >/dev/null 2>&1
    done
    for p in $NODE_PIDS; do kill -9 "$p" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "stopped by /init: the scenario ran out of time"' TERM
log "scenario $NAME: device $NBD, ports $((PORT + 1))-$((PORT + 4))"
