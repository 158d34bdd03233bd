# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# attach-ioctl: attach-ext4's round trip with `blockctl attach --ioctl` (the device
# configured with NBD_SET_SOCK/NBD_DO_IT instead of netlink).
# shellcheck source=lib.sh
. /scenarios/lib.sh

pair_up
attach --ioctl
check_queue
check_oom "$RESIDENT" "the attach resident (--ioctl)"
fs_roundtrip ext4 --ioctl
pair_down
