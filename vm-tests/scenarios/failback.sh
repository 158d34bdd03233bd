# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# failback: two failovers under one mounted ext4 and one fsyncing writer, with two
# connections per device (multi-conn): alpha's blockd killed, beta promoted; alpha
# restarted, resynced from beta (it comes back as Secondary); beta's blockd killed,
# alpha promoted. The resident reconnects both sockets each time and the writer goes
# on; then a clean e2fsck and every logged file's sha256.
# shellcheck source=lib.sh
. /scenarios/lib.sh

# failover_to OLD NEW: kill -9 OLD's blockd, promote NEW, 20 more files.
failover_to() {
    local pid n t0
    pid=$(field "$1" .pid)
    log "kill -9 $1's blockd (pid $pid) after $(written) files"
    t0=$(now)
    kill -9 "$pid"
    wait_until "$1's blockd gone" 10 not_running "$pid"
    log "+ ctl $2 primary   (until it succeeds)"
    wait_until "$2 promoted" 30 ctl "$2" primary
    n=$(written)
    wait_until "20 more files written after $2's promotion" 120 written_at_least $((n + 20))
    STALLS="$STALLS $(awk -v k="$t0" '$1 < k {last = $1} $1 >= k && !first {first = $1}
        END {if (first && last) printf "%.1f", first - last; else print "?"}' "$DIR/wtimes")s"
}

pair_up
attach --connections 2 --timeout-secs 10 --dead-conn-timeout-secs 120
queues=0
for q in "$SYS"/mq/*; do [ -e "$q" ] && queues=$((queues + 1)); done
[ "$queues" = 2 ] || fail "$NBD has $queues hardware queues, expected 2 (one per connection)"
mkfs_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
start_writer
wait_until "the writer wrote 20 files" 60 written_at_least 20
STALLS=
failover_to alpha beta

# alpha comes back: it was a crashed Primary; it must resync from beta.
node_up alpha
wait_until "alpha back, connected and UpToDate" 60 connected alpha
log "alpha: $(field alpha '.role + " " + .disk + ", peer " + .peers[0].role + " " + .peers[0].replication')"
failover_to beta alpha

stop_writer
total=$(written)
verify_fs
detach
pair_down
note "2 connections; writer stalled$STALLS; $total files"
