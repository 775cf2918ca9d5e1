/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Attached to the tc ingress (clsact) of the inter-cluster tunnel devices (vx-bridge,
 * vx-bridge-6) to execute on packets entering the node from other clusters, after decapsulation:
 * destination global -> local (and, in ICMP errors, the quoted source likewise).
 */
#include "xlate.h"

int xlate_tunnel_ingress(struct __sk_buff *skb)
{
	/* TC_ACT_SHOT only for a packet that matches a mapping and cannot be translated whole. */
	return xlate(skb, XLATE_DNAT) == XLATE_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
