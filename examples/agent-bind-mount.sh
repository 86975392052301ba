#!/bin/sh
# How an agent gives a container one vfolder: grant the container's cgroup a mode, then
# bind-mount /mnt/vfroot/<host>/<uuid> into the container's own mount namespace.
#
#   examples/agent-bind-mount.sh HOST VFOLDER-UUID MODE COMMAND [ARG...]
#
# runs COMMAND as a stand-in "container": in a new cgroup under /docker and a private mount
# namespace where the vfolder appears at /home/work/<uuid> (its working directory). MODE is
# ro, rw or rwd. Docker or containerd do the same with `-v /mnt/vfroot/HOST/UUID:/home/work/UUID`
# and the container's cgroup (cgroup:/system.slice/docker-<id>.scope or cgroup:/docker/<id>).
# Needs root, a running `vfusefs serve`, and cgroup v2. Set VFUSEFS_CONFIG (or pass nothing and
# use /etc/vfusefs/vfusefs.toml) so `vfusefs` finds the daemon; VFUSEFS may name the binary.
set -eu
[ $# -ge 4 ] || { echo "usage: $0 HOST VFOLDER-UUID MODE COMMAND [ARG...]" >&2; exit 2; }
host=$1 vfid=$2 mode=$3
shift 3
vfusefs=${VFUSEFS:-vfusefs}

# the cgroup-v2 hierarchy: /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts
if [ -e /sys/fs/cgroup/unified/cgroup.procs ]; then cgroot=/sys/fs/cgroup/unified
else cgroot=/sys/fs/cgroup; fi
[ -e "$cgroot/cgroup.procs" ] || { echo "$0: no cgroup v2 hierarchy found" >&2; exit 1; }

mountpoint=$("$vfusefs" status --json | sed -n 's/.*"mountpoint": "\(.*\)".*/\1/p')
src=$mountpoint/$host/$vfid
ctr=agent-demo-$$
mkdir -p "$cgroot/docker/$ctr"
cleanup() {
    "$vfusefs" revoke "$host" "$vfid" "cgroup:/docker/$ctr" >/dev/null 2>&1 || true
    rmdir "$cgroot/docker/$ctr" 2>/dev/null || true
}
trap cleanup EXIT

# 1. the grant: this container's cgroup gets MODE on the vfolder (takes effect at once)
"$vfusefs" grant "$host" "$vfid" "cgroup:/docker/$ctr" "$mode" >/dev/null

# 2. the container: join the cgroup, then a private mount namespace with the vfolder bind-mounted
unshare --mount --propagation private sh -c '
    echo $$ > "$1/docker/$2/cgroup.procs"
    mount -t tmpfs tmpfs /home
    mkdir -p "/home/work/$3"
    mount --bind "$4" "/home/work/$3"
    cd "/home/work/$3"
    shift 4
    exec "$@"
' sh "$cgroot" "$ctr" "$vfid" "$src" "$@"
