"""``fabric-tool bench``: benchmarks that print each figure beside a baseline measured in the same run.

:mod:`tools.bench.suite` is the entry point and registry, :mod:`tools.bench.common` the shared
runner (options, reports, processes, labs); one module per benchmark (``datapath``, ``restart``,
``netlink``, ``gateway``, ``failover``, ``translate``, ``control``) and ``rr``, the
request/response helper process. Lab and test code only: may import anything in the tree.
"""
