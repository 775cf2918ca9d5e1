"""The VM tier (issue 22): the fabric on several real kernels.

Flow: :mod:`tools.vm.image` builds one Debian 12 disk image from Debian packages (plus a
wheelhouse of the project's Python dependencies, pinned to the versions this checkout runs with)
and caches it under ``/var/cache/kosmos-fabric/vm/<input hash>``; :mod:`tools.vm.runner` boots N
VMs from it with qemu (direct kernel boot, one qcow2 overlay each, a private bridge inside a
network namespace of its own, ssh through a user-mode port forward on 127.0.0.1), copies the
project source in, starts the reflector and one agent per VM as systemd services, and plays
the clusters' CNI (one pod namespace per VM, host-gw routes inside each cluster);
:mod:`tools.vm.cli` is ``fabric-tool vm``. ``vagrant/`` builds laptops' VMs from the same image
and the same provisioning script.
"""
