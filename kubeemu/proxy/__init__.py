"""The lab's kube-proxy (``python -m kubeemu.proxy``): Services and EndpointSlices of one
emulated cluster programmed as nftables rules in every node network namespace of it, after
upstream's nftables proxier (``pkg/proxy/nftables``).

:mod:`kubeemu.proxy.rules` is the pure part (objects -> the text of one table per family and
node); :mod:`kubeemu.proxy.apply` puts a table into a node namespace (``nsenter ... nft -f -``,
one atomic transaction, skipped when the kernel already has it);
:mod:`kubeemu.proxy.main` is the process: informers, a rate-limited sync loop, the flags.
Lab and test code only: production packages never import it.
"""
