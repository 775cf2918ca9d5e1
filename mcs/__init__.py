"""Multi-cluster services (issue 18): Services exported from member clusters imported into the others.

Built on the Kubernetes Multi-Cluster Services API (KEP-1645, group ``multicluster.x-k8s.io``):
a ServiceExport next to a Service marks it for export; every member then gets a ServiceImport
and a derived Service (``<name>-clusterset``) whose EndpointSlices list the exporting clusters' ready
endpoints. Pure logic: :mod:`mcs.derive` (what the members export -> what each imports), :mod:`mcs.kube`
(API objects in and out), :mod:`mcs.plan` (the delta), :mod:`mcs.dns` (the clusterset zone's
answers). I/O: :mod:`mcs.apply` (one member's writes), :mod:`mcs.controller` (informers, passes,
one writer thread per member), :mod:`mcs.reachability` (the fabric's records), :mod:`mcs.dnsserver`
(UDP/TCP responders), :mod:`mcs.main` (``kosmos-mcs``). ``fabric-tool export|unexport|services``
live in :mod:`tools.mcs`.
"""
