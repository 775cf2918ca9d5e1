/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Attached to the tc egress (clsact) of the inter-cluster tunnel devices (vx-bridge,
 * vx-bridge-6) to execute on packets leaving the node for other clusters, before encapsulation:
 * source local -> global (and, in ICMP errors we send, the quoted destination likewise, also when
 * a node address of no mapping sends the error), so a local address never reaches a cluster
 * where it may belong to someone else.
 */
#include "xlate.h"

int xlate_tunnel_egress(struct __sk_buff *skb)
{
	return xlate(skb, XLATE_SNAT) == XLATE_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
