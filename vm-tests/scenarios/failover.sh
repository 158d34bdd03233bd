# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# failover: ext4 on the Primary's export (alpha) with a writer that fsyncs every
# file (and its directory) before logging it; alpha's blockd is killed (-9) and beta
# promoted; the attached device must reconnect to beta by itself (attach's resident,
# NBD RECONFIGURE) and the writer go on: at least 20 more files after the
# promotion. Then a clean e2fsck and every logged file's sha256. The PASS line says
# how long the writer stalled.
# shellcheck source=lib.sh
. /scenarios/lib.sh

pair_up
alpha=$(field alpha .pid)
attach --timeout-secs 10 --dead-conn-timeout-secs 120
resident=$RESIDENT
mkfs_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
start_writer
wait_until "the writer wrote 30 files" 60 written_at_least 30

log "kill -9 alpha's blockd (pid $alpha) after $(written) files"
t_kill=$(now)
kill -9 "$alpha"
wait_until "alpha's blockd gone" 10 not_running "$alpha"
log "+ ctl beta primary   (until it succeeds)"
wait_until "beta promoted" 30 ctl beta primary
t_prom=$(now)
n_prom=$(written)
log "beta is Primary, $(awk "BEGIN {print $t_prom - $t_kill}")s after the kill; $n_prom files written"
[ "$(field beta .role)" = Primary ] || fail "beta is not Primary after \`primary\`"
wait_until "20 more files written after beta's promotion (the device did not come back)" 120 \
    written_at_least $((n_prom + 20))
stop_writer
total=$(written)
[ "$(dev_pid "$NBD")" = "$resident" ] ||
    log "note: $SYS/pid is '$(dev_pid "$NBD")', was $resident before the failover"

# The stall: from the writer's last completion before the kill to its first after.
stall=$(awk -v k="$t_kill" '$1 < k {last = $1} $1 >= k && !first {first = $1}
    END {if (first && last) printf "%.1f", first - last; else print "?"}' "$DIR/wtimes")
log "writer stalled ${stall}s across the failover; $total files in all"

verify_fs
detach
pair_down
note "writer stalled ${stall}s; beta Primary $(awk "BEGIN {printf \"%.1f\", $t_prom - $t_kill}")s after kill -9;" \
    "$((total - n_prom)) of $total files written after the promotion"
