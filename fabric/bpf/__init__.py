"""eBPF programs for stateless 1:1 global-IP translation (IPv4 and IPv6) on tc clsact.

C sources: one entry file per attach point (``tunnel_ingress.bpf.c``, ``tunnel_egress.bpf.c``,
``hairpin.bpf.c``) and headers by role (parsing, checksums, maps, the translation itself).
``translate`` compiles them with bcc, attaches them with pyroute2 and pins their maps so they
outlive an agent restart; ``libbpf`` is the thin ctypes layer for pinned maps.

May import: the shared modules at the ``fabric`` root below the components (``types``,
``netns``); never the control plane, the agent or anything of the lab.
"""
