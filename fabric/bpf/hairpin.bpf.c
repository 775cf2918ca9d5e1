/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Attached to the tc egress (clsact) of the node's hairpin device: an ifb device (the agent
 * names it "kf-hairpin"; ifb rather than dummy because this kernel has no dummy module) that this
 * cluster's own global CIDRs are routed to on every node.
 * A pod reaching a pod of its own cluster through the global address never crosses a tunnel, so
 * the translation happens here: destination global -> local and, so that the reply comes back
 * through here too, source local -> global; then the packet is redirected to the ingress of the
 * same device and routed again, now to the local pod.
 *
 *   pod A 10.0.0.5 -> 100.64.0.7   ==hairpin==>   100.64.0.5 -> 10.0.0.7   (pod B sees A's
 *   pod B 10.0.0.7 -> 100.64.0.5   ==hairpin==>   100.64.0.7 -> 10.0.0.5    global address)
 *
 * Both directions are the same stateless rewrite, so A's socket sees the global address it
 * connected to. Packets routed here that match no mapping (a stale route) are left to the ifb
 * device, which discards them (an ifb with no redirect source drops what it transmits).
 */
#include "xlate.h"

int xlate_hairpin(struct __sk_buff *skb)
{
	int ret = xlate(skb, XLATE_DNAT | XLATE_SNAT | XLATE_HAIRPIN);

	if (ret == XLATE_DROP)
		return TC_ACT_SHOT;
	if (ret == XLATE_DONE)
		return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
	return TC_ACT_OK;
}
