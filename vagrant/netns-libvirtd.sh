#!/bin/sh
# libvirtd inside a network namespace of its own, for vagrant/Vagrantfile on a machine whose
# root network namespace must not change (a shared CI or build host; see vagrant/README.md).
#
# libvirtd creates its networks' bridges, their addresses, dnsmasq and NAT rules in the network
# namespace it runs in. Started here under `ip netns exec`, all of that lives in the namespace
# (default kf-libvirt) and goes with it; the root namespace gets nothing. The control socket
# (/run/libvirt/libvirt-sock) is a file, so virsh can reach libvirtd from anywhere, but
# vagrant must run in the namespace too: it ssh-es to the VMs' management addresses, which
# exist only there (`netns-libvirtd.sh run vagrant up`).
#
#   sudo vagrant/netns-libvirtd.sh start       namespace + virtlogd + libvirtd (PIDs in /run/kf-libvirt)
#   sudo vagrant/netns-libvirtd.sh run CMD...  CMD in the namespace (e.g. vagrant up)
#   sudo vagrant/netns-libvirtd.sh status      the daemons, libvirt's domains, networks, pools, volumes
#   sudo vagrant/netns-libvirtd.sh purge       delete the box volume and the pool vagrant-libvirt made
#   sudo vagrant/netns-libvirtd.sh stop        end the daemons (by recorded PID) and what is left in the
#                                              namespace (dnsmasq), delete the namespace
#
# It refuses to start while the libvirtd units are not masked, so a system libvirtd (which would
# make virbr0 with 192.168.122.1 in the root namespace) cannot run beside it:
#   systemctl mask libvirtd.service libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket \
#                  virtlogd.service virtlogd.socket virtlogd-admin.socket
# KF_LIBVIRT_NETNS overrides the namespace's name.
set -eu

NS=${KF_LIBVIRT_NETNS:-kf-libvirt}
RUN=/run/kf-libvirt
LIBVIRT_URI=qemu:///system
export LIBVIRT_DEFAULT_URI=$LIBVIRT_URI

die() { echo "netns-libvirtd: $*" >&2; exit 1; }
say() { echo "netns-libvirtd: $*" >&2; }

# pid_of NAME: the recorded PID of daemon NAME when that process is still the daemon we started.
pid_of() {
    [ -r "$RUN/$1.pid" ] || return 1
    pid=$(cat "$RUN/$1.pid")
    [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$1" ] || return 1
    echo "$pid"
}

ns_exists() { ip netns list | awk '{print $1}' | grep -qx "$NS"; }

ns_inode() { stat -L -c %i "/run/netns/$NS"; }

# Processes whose network namespace is ours (dnsmasq of libvirt's networks, qemu, the daemons).
pids_in_ns() {
    ino=$(ns_inode) || return 0
    for p in /proc/[0-9]*; do
        [ "$(stat -L -c %i "$p/ns/net" 2>/dev/null)" = "$ino" ] && echo "${p#/proc/}"
    done
    return 0
}

# wait_gone PID...: up to 10 s for the processes to end.
wait_gone() {
    i=0
    while [ $i -lt 50 ]; do
        alive=""
        for p in "$@"; do [ -d "/proc/$p" ] && alive="$alive $p"; done
        [ -z "$alive" ] && return 0
        sleep 0.2
        i=$((i + 1))
    done
    return 1
}

start() {
    [ "$(id -u)" = 0 ] || die "needs root (namespaces, libvirtd)"
    command -v libvirtd >/dev/null || die "libvirtd not found (Debian: libvirt-daemon-system, libvirt-daemon-driver-qemu)"
    if command -v systemctl >/dev/null; then
        for u in libvirtd.service libvirtd.socket virtlogd.socket; do
            state=$(systemctl is-enabled "$u" 2>/dev/null || true)
            [ "$state" = masked ] || [ "$state" = "" ] || [ "$state" = not-found ] ||
                die "$u is $state, not masked: a system libvirtd would make its bridges in the root namespace; mask it first (see the header of $0)"
        done
    fi
    for d in libvirtd virtlogd; do
        if pid=$(pid_of $d); then die "$d already runs (PID $pid); '$0 stop' first"; fi
        if pgrep -x $d >/dev/null; then
            die "another $d runs (PID $(pgrep -x $d | tr '\n' ' ')), not started by this script: refusing to start a second one"
        fi
    done
    mkdir -p "$RUN"
    if ! ns_exists; then
        ip netns add "$NS"
        say "namespace $NS created"
    fi
    ip -n "$NS" link set lo up
    ip netns exec "$NS" virtlogd --daemon --pid-file "$RUN/virtlogd.pid"
    ip netns exec "$NS" libvirtd --daemon --pid-file "$RUN/libvirtd.pid"
    i=0
    until virsh -q version >/dev/null 2>&1; do
        i=$((i + 1))
        [ $i -lt 60 ] || die "libvirtd did not answer on $LIBVIRT_URI in 30 s"
        sleep 0.5
    done
    say "libvirtd PID $(pid_of libvirtd), virtlogd PID $(pid_of virtlogd), in namespace $NS ($LIBVIRT_URI)"
}

stop() {
    [ "$(id -u)" = 0 ] || die "needs root"
    pids=""
    for d in libvirtd virtlogd; do
        if pid=$(pid_of $d); then kill -TERM "$pid"; pids="$pids $pid"; fi
    done
    # shellcheck disable=SC2086
    [ -z "$pids" ] || wait_gone $pids || die "daemons $pids still run 10 s after SIGTERM"
    rm -f "$RUN/libvirtd.pid" "$RUN/virtlogd.pid"
    rmdir "$RUN" 2>/dev/null || true
    if ns_exists; then
        # Only processes in our namespace: libvirt's dnsmasq (it outlives libvirtd by design) and
        # a qemu a `vagrant destroy` did not end.
        left=$(pids_in_ns)
        if [ -n "$left" ]; then
            for p in $left; do say "ending PID $p ($(cat /proc/"$p"/comm 2>/dev/null)) left in $NS"; done
            # shellcheck disable=SC2086
            kill -TERM $left 2>/dev/null || true
            # shellcheck disable=SC2086
            wait_gone $left || die "processes $left in $NS did not end"
        fi
        ip netns del "$NS"
        say "namespace $NS deleted"
    fi
}

status() {
    for d in libvirtd virtlogd; do
        if pid=$(pid_of $d); then echo "$d: PID $pid"; else echo "$d: not running"; fi
    done
    if ns_exists; then
        echo "namespace $NS: processes $(pids_in_ns | tr '\n' ' ')"
        ip -n "$NS" -br addr
    else
        echo "namespace $NS: absent"
    fi
    if pid_of libvirtd >/dev/null; then
        echo "domains:"; virsh list --all --name | sed '/^$/d;s/^/  /'
        echo "networks:"; virsh net-list --all --name | sed '/^$/d;s/^/  /'
        echo "pools:"; virsh pool-list --all --name | sed '/^$/d;s/^/  /'
        for pool in $(virsh pool-list --name); do
            virsh vol-list "$pool" | awk 'NR > 2 && NF {print "  " $1 " (pool '"$pool"')"}'
        done
    fi
}

# The box's volume (vagrant-libvirt uploads it once and keeps it for the next `vagrant up`) and
# the pool it made, when nothing else is in them.
purge() {
    pid_of libvirtd >/dev/null || die "libvirtd (ours) is not running: '$0 start' first"
    [ -z "$(virsh list --all --name | sed '/^$/d')" ] || die "domains remain ($(virsh list --all --name | tr '\n' ' ')): 'vagrant destroy -f' first"
    for pool in $(virsh pool-list --all --name); do
        virsh pool-info "$pool" | grep -q '^State: *running' || virsh -q pool-start "$pool" || true
        for vol in $(virsh vol-list "$pool" | awk 'NR > 2 && NF {print $1}'); do
            case "$vol" in
                kosmos-fabric-VAGRANTSLASH-*) virsh -q vol-delete --pool "$pool" "$vol" && say "deleted volume $vol ($pool)";;
                *) say "left volume $vol in pool $pool (not the box's)";;
            esac
        done
        if [ -z "$(virsh vol-list "$pool" | awk 'NR > 2 && NF')" ]; then
            virsh -q pool-destroy "$pool" && virsh -q pool-undefine "$pool" && say "removed pool $pool"
        fi
    done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    start) start;;
    stop) stop;;
    status) status;;
    purge) purge;;
    run)
        [ $# -gt 0 ] || die "run: which command? e.g. '$0 run vagrant up'"
        ns_exists || die "namespace $NS is absent: '$0 start' first"
        exec ip netns exec "$NS" "$@";;
    *) die "usage: $0 start|run CMD...|status|purge|stop";;
esac
