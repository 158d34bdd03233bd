# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# errors: attach refuses, with exit 1 and a message saying why, and leaves no device
# configured: the nbd module not loaded; a device that is already attached; a
# resource the nodes do not export; no node Primary.
# shellcheck source=lib.sh
. /scenarios/lib.sh

# not_attached DEVICE: a refused attach left nothing behind.
not_attached() {
    [ -z "$(dev_pid "$1")" ] || fail "$1 attached (pid $(dev_pid "$1")) after a refused attach"
}

pair_up

# The module: unloading it only works while no device is in use, so this scenario
# runs before any other that attaches.
if rmmod nbd 2>"$DIR/rmmod.err"; then
    log "nbd module unloaded"
    refused blockctl --config "$CFG" attach r0 "$NBD"
    says 'module|nbd' "attach without the nbd module"
    must insmod /lib/modules/nbd.ko
    wait_until "$NBD back after insmod nbd" 10 test -b "$NBD"
else
    fail "rmmod nbd failed ($(cat "$DIR/rmmod.err")): a device is in use; run errors first"
fi

# Already attached.
attach
first=$RESIDENT
refused blockctl --config "$CFG" attach r0 "$NBD"
says 'busy|attached|in use|connected|already' "attach to an attached device"
[ "$(dev_pid "$NBD")" = "$first" ] || fail "$NBD's resident changed after a refused attach"
[ -d "/proc/$first" ] || fail "the first attach's resident (pid $first) died after a refused attach"

# A resource nobody exports: same addresses, another name.
write_config "$DIR/r1.toml" r1
refused blockctl --config "$DIR/r1.toml" attach r1 "$NBD2"
says 'r1|export' "attach of a resource that is not exported"
not_attached "$NBD2"
detach

# No Primary.
must ctl alpha secondary
refused blockctl --config "$CFG" attach r0 "$NBD"
says 'primary' "attach with no Primary"
not_attached "$NBD"

pair_down
