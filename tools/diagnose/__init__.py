"""Diagnostics: ``fabric-tool check`` (:mod:`~tools.diagnose.check`, the all-pairs matrix),
the probe process it runs inside pods (:mod:`~tools.diagnose.probe`, scapy), and
``fabric-tool diagnose state|trace|mtu`` (:mod:`~tools.diagnose.diagnose`). Tools only: may
import anything in the tree; production code never imports them.
"""
