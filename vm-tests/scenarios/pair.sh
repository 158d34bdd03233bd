# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# pair: the guest basics without the kernel client: the nbd module gave block
# devices, a replicated pair comes up on loopback, alpha is promoted, status --json
# shows both sides Connected and UpToDate, beta refuses promotion while alpha is
# Primary, and both nodes stop cleanly.
# shellcheck source=lib.sh
. /scenarios/lib.sh

[ -b "$NBD" ] || fail "$NBD is not a block device (nbd module?)"
[ "$(cat "$SYS/size")" = 0 ] || fail "$NBD is not free"
pair_up
must ctl alpha status --json
[ "$(field beta .role)" = Secondary ] || fail "beta is not Secondary"
[ "$(field beta '.peers[0].role')" = Primary ] || fail "beta does not see alpha as Primary"
connected beta || fail "beta: not Established/UpToDate"
refused ctl beta primary
says primary "beta primary while alpha is Primary"
pair_down
