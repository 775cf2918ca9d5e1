"""Multi-cluster services (issue 18): Services exported from member clusters imported into the others.

Built on the Kubernetes Multi-Cluster Services API (KEP-1645, group ``multicluster.x-k8s.io``):
a ServiceExport next to a Service marks it for export; every member then gets a ServiceImport
and a derived Service (``<name>-clusterset``) whose EndpointSlices list the exporting clusters' ready
endpoints. This package starts with what every other part is built on: :mod:`mcs.derive`, the
pure function from what the members export to what each of them imports.
"""
