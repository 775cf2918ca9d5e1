#!/usr/bin/env bash
# One entry point for newcomers and CI. Every command first runs the idempotent set-up.
#
#   ./dev.sh lab      set up, bring up the default lab (examples/lab.yaml), print its matrix
#   ./dev.sh test     set up, run the whole test suite (unit, privileged, lab tiers)
#   ./dev.sh setup    only the set-up
#   ./dev.sh lint     ruff, mypy, import-linter
#
# FABRIC_VM_TIER=1 (CI sets it: .ci/run) turns the VM tier (tests/vm) on; set-up then also installs
# what it needs (qemu-system-x86, qemu-utils, mmdebstrap, e2fsprogs, openssh-client). Without it
# the tier is skipped and none of that is installed. FABRIC_VM_TIER=0 turns it off under CI too.
#
# Set-up (Debian 12, as root or with sudo): apt packages (python3-bpfcc, kernel headers,
# iproute2, iputils-ping, iperf3, ethtool), the kernel headers link bcc needs, a virtualenv in
# .venv made from Debian's python3 with system site packages (so `import bcc` works), the
# project installed editable with its dev extras, and the gRPC stubs generated.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD
VENV=$ROOT/.venv
APT_PACKAGES=(python3-bpfcc python3-venv python3-dev linux-headers-amd64 iproute2 iputils-ping iperf3 ethtool nftables)
# The VM tier's (tests/vm, tools/vm): qemu boots the VMs (TCG), qemu-img makes their overlays and
# the image's qcow2, mmdebstrap + mkfs.ext4 build the image from Debian packages, ssh reaches the
# guests and ssh-keygen makes the image's key. Installed only when the tier is requested.
VM_APT_PACKAGES=(qemu-system-x86 qemu-utils mmdebstrap e2fsprogs openssh-client)
if [ "${FABRIC_VM_TIER:-}" = 1 ]; then APT_PACKAGES+=("${VM_APT_PACKAGES[@]}"); fi

log() { printf '\033[1m[dev]\033[0m %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

setup_apt() {
    local missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
}

setup_headers() {
    # bcc compiles against /lib/modules/$(uname -r)/build. Kernels that do not come from a
    # Debian package (VMs with their own kernel) have no such link: point it at the installed
    # linux-headers-amd64 tree (UAPI is stable, which is all our programs use).
    local k mod hdr common
    k=$(uname -r)
    mod=/lib/modules/$k
    if [ -e "$mod/build/include" ]; then return; fi
    hdr=$(ls -d /usr/src/linux-headers-"$k" 2>/dev/null || ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
    if [ -z "$hdr" ]; then log "no kernel headers under /usr/src; bcc programs will not compile"; return; fi
    common=${hdr%-amd64}-common
    log "linking $mod/build -> $hdr"
    as_root mkdir -p "$mod"
    as_root ln -sfn "$hdr" "$mod/build"
    [ -d "$common" ] && as_root ln -sfn "$common" "$mod/source"
    return 0
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(0 if sys.base_prefix == "/usr" else 1)'; then
        log "creating $VENV from Debian's /usr/bin/python3 (with system site packages for bcc)"
        rm -rf "$VENV"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    local stamp=$VENV/.installed-$(cat pyproject.toml packaging/lab/pyproject.toml | sha256sum | cut -c1-16)
    if [ ! -e "$stamp" ]; then
        log "installing kosmos-fabric and kosmos-fabric-lab (editable) and the dev tools into $VENV (log: $VENV/pip.log)"
        if ! { "$VENV/bin/pip" install --upgrade pip && "$VENV/bin/pip" install -e ".[dev]" -e packaging/lab; } >"$VENV/pip.log" 2>&1; then
            tail -30 "$VENV/pip.log" >&2
            log "pip install failed; full log in $VENV/pip.log"
            exit 1
        fi
        rm -f "$VENV"/.installed-*
        touch "$stamp"
    fi
    "$VENV/bin/python" -m fabric.control.protogen
}

setup() {
    setup_apt
    setup_headers
    setup_venv
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    lab)
        setup
        "$VENV/bin/fabric-tool" lab up "${@:-examples/lab.yaml}"
        "$VENV/bin/fabric-tool" check
        ;;
    test)
        setup
        rc=0
        # A long fuzz run (FABRIC_FUZZ_EXAMPLES=N ./dev.sh test -m fuzz; tests/fuzzing.py) takes as
        # long as its budget: no per-test time limit then (pytest-timeout's 600 s would end it).
        extra=()
        if [ -n "${FABRIC_FUZZ_EXAMPLES:-}" ]; then extra=(--timeout=0); fi
        # Under CI the slowest tests are listed at the end: where the run's time goes.
        if [ "${CI:-}" = true ]; then extra+=(--durations=25); fi
        "$VENV/bin/python" -m pytest "${extra[@]}" "$@" || rc=$?
        if [ "$rc" = 5 ]; then log "pytest collected no tests"; rc=0; fi
        exit "$rc"
        ;;
    lint)
        setup
        "$VENV/bin/ruff" check .
        "$VENV/bin/mypy"  # the packages [tool.mypy] files names
        "$VENV/bin/lint-imports"
        ;;
    *)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        [ "$cmd" = help ] || exit 2
        ;;
esac
