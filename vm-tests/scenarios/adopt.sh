# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# adopt: the attach resident is killed (-9) while ext4 is mounted with a writer
# running; the device stays attached but nothing watches it. `blockctl attach` of
# the same device then adopts it (a new resident, recorded in
# /run/blockd/attach-nbdN.pid), and a crash failover (kill -9 alpha, promote beta)
# is survived as with the original resident. Then a clean e2fsck, every logged
# file's sha256, and `detach` stops the adopted resident.
# shellcheck source=lib.sh
. /scenarios/lib.sh

pair_up
alpha=$(field alpha .pid)
attach --timeout-secs 10 --dead-conn-timeout-secs 120
old=$RESIDENT
mkfs_ ext4 "$NBD"
must mount -t ext4 "$NBD" "$MNT"
start_writer
wait_until "the writer wrote 10 files" 60 written_at_least 10

log "kill -9 the resident (pid $old)"
kill -9 "$old"
wait_until "the resident gone" 10 not_running "$old"
[ -n "$(dev_pid "$NBD")" ] || fail "$NBD detached when its resident died"
must blockctl --config "$CFG" attach r0 "$NBD" --timeout-secs 10 --log "$DIR/attach-adopt.log"
printf '%s\n' "$OUT" | grep -q "adopted" || fail "attach of an orphaned device did not say it adopted it: $OUT"
pidfile=/run/blockd/attach-${NBD#/dev/}.pid
new=$(cat "$pidfile" 2>/dev/null || true)
if [ -z "$new" ] || [ "$new" = "$old" ] || not_running "$new"; then
    fail "no live adopted resident recorded in $pidfile ('$new')"
fi
refused blockctl --config "$CFG" attach r0 "$NBD"
says "already attached .*pid $new" "a second attach while the adopted resident runs"

n_kill=$(written)
log "kill -9 alpha's blockd (pid $alpha) after $n_kill files"
kill -9 "$alpha"
wait_until "alpha's blockd gone" 10 not_running "$alpha"
wait_until "beta promoted" 30 ctl beta primary
n_prom=$(written)
wait_until "20 more files written after beta's promotion (the adopted device did not come back)" 120 \
    written_at_least $((n_prom + 20))
stop_writer
grep -q "reconnected to beta" "$DIR/attach-adopt.log" || fail "the adopted resident did not log its reconnect"

verify_fs
must blockctl detach "$NBD"
wait_until "the adopted resident (pid $new) gone after detach" 15 not_running "$new"
[ ! -e "$pidfile" ] || fail "$pidfile left behind"
pair_down
note "adopted after kill -9 of the resident; $(($(written) - n_prom)) files after the failover"
