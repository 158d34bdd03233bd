# shellcheck shell=dash source-path=SCRIPTDIR disable=SC2119
# attach-xfs: attach-ext4's round trip with XFS (mkfs.xfs, fstrim, xfs_repair -n).
# mkfs.xfs refuses filesystems under 300 MiB.
DISK_SIZE=320M # read by lib.sh
# shellcheck source=lib.sh
. /scenarios/lib.sh

pair_up
attach
check_queue
fs_roundtrip xfs
pair_down
