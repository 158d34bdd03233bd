# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# attach-ext4: `blockctl attach` (netlink) to the Primary of a protocol C pair; the
# kernel took FLUSH/FUA/TRIM; backend identifier; the Primary's blockd and the attach
# resident are exempt from the OOM killer; ext4 round trip with fstrim, a clean
# e2fsck after detach + attach, every file's sha256 intact.
# shellcheck source=lib.sh
. /scenarios/lib.sh

pair_up
attach
check_queue
v=$(cat "$SYS/backend")
[ "$v" = blockd:r0 ] || fail "$SYS/backend is '$v', expected 'blockd:r0'"
check_oom "$(field alpha .pid)" "alpha's blockd (Primary)"
check_oom "$RESIDENT" "the attach resident"
fs_roundtrip ext4
pair_down
