#!/bin/sh
# vagrant/Vagrantfile's after-up trigger: `check.sh VM` records that VM is up and, once every VM
# of the settings is, waits until every agent reports its plan applied (the reflector's view,
# read through ssh on the reflector's VM) and prints `fabric-tool check`'s matrix for the VMs
# (`fabric-tool vm check --vagrant`). Exit 1 when a pair fails or the agents are not in sync
# in KF_SYNC_TIMEOUT seconds (default 900: the agents' first BPF compile in a TCG guest takes
# minutes).
#
# Why a marker per VM: `vagrant up` brings libvirt VMs up in parallel, so the last VM in the
# file is not the last one up; the trigger that finds all markers runs the check. The markers
# live in $KF_PREPARED/up and go with `vagrant destroy` (the Vagrantfile's after-destroy trigger).
# Run it by hand with any VM name to check again: `vagrant/check.sh vm1`.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
SETTINGS=${KF_SETTINGS:-$HERE/settings.yaml}
PREPARED=${KF_PREPARED:-$HERE/.prepared}
VENV=${KF_VENV:-$ROOT/.venv}
TIMEOUT=${KF_SYNC_TIMEOUT:-900}

[ $# -ge 1 ] || { echo "usage: $0 VM (the VM that just came up)" >&2; exit 2; }
mkdir -p "$PREPARED/up"
touch "$PREPARED/up/$1"

# The VMs of the settings, in file order (the Vagrantfile's reading of the same file).
vms=$("$VENV/bin/python" -c '
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
print(" ".join(n["name"] for c in doc["clusters"] for n in c.get("nodes") or []))
' "$SETTINGS")
for v in $vms; do
    if [ ! -e "$PREPARED/up/$v" ]; then
        echo "kosmos-fabric: $1 is up; the check runs when every VM is (waiting for $v)"
        exit 0
    fi
done

cfg="$PREPARED/ssh-config"
(cd "$HERE" && vagrant ssh-config $vms > "$cfg.tmp") && mv "$cfg.tmp" "$cfg"
echo "kosmos-fabric: every VM is up ($vms); waiting until every agent is in sync (up to $TIMEOUT s)"
cd "$ROOT"
t0=$(date +%s)
"$VENV/bin/python" -c '
import sys
from pathlib import Path
from tools.lab.state import LabError
from tools.vm import runner
st = runner.vagrant_state(Path(sys.argv[1]), Path(sys.argv[2]))
try:
    runner.wait_in_sync(st, float(sys.argv[3]), lambda m: print(f"kosmos-fabric: {m}", flush=True))
except LabError as e:
    sys.exit(f"kosmos-fabric: {e}")
' "$SETTINGS" "$cfg" "$TIMEOUT"
echo "kosmos-fabric: in sync after $(( $(date +%s) - t0 )) s; fabric-tool vm check --vagrant --services"
exec "$VENV/bin/fabric-tool" vm check --vagrant "$cfg" --settings "$SETTINGS" --services
