/* SPDX-License-Identifier: Apache-2.0 */
/*
 * csum.h - address stores with their checksum fix-ups, through the kernel helpers only.
 *
 * Why helpers and not hand-written arithmetic: bpf_l4_csum_replace() knows skb->ip_summed. For a
 * CHECKSUM_PARTIAL skb (locally generated TCP/UDP with offload, GSO super-packets) the L4 field
 * holds the folded pseudo-header sum only and must be updated with the pseudo-header delta
 * (BPF_F_PSEUDO_HDR), while a payload change must leave it alone; for CHECKSUM_COMPLETE
 * (received) skbs, skb->csum must follow IPv4 changes (and, with BPF_F_IPV6, must not follow
 * IPv6 ones). bpf_l3_csum_replace() always patches the field, which is what a checksum that sits
 * in the payload (the header quoted in an ICMP error) needs.
 *
 * Every function returns 0 or a negative errno; callers turn a failure into DROP_STORE_FAILED.
 */
#ifndef __XLATE_CSUM_H
#define __XLATE_CSUM_H

#include "consts.h"

/* A 16-bit checksum field padded to 4 bytes so that bpf_csum_diff() can take it. Every checksum
 * field we touch sits at an even offset from the start of the ICMP message, so summing it as the
 * first 16-bit word of a 4-byte block is the same as summing it in place. */
struct csum16_block {
	__u16 v;
	__u16 zero;
};

static __always_inline int l4_csum_ipv6(struct __sk_buff *skb, int off, __s64 diff, __u64 flags)
{
	int ret;

#ifdef ENABLE_CSUM_IPV6_FLAG
	ret = bpf_l4_csum_replace(skb, off, 0, diff, flags | XLATE_F_IPV6);
	if (ret != -22 /* -EINVAL: kernel without BPF_F_IPV6 */)
		return ret;
#endif
	ret = bpf_l4_csum_replace(skb, off, 0, diff, flags);
	return ret;
}

/* Rewrite the IPv4 address at addr_off from old to new: IPv4 header checksum at l3csum_off, and
 * the L4 checksum at l4csum_off (if >= 0) with the pseudo-header flag plus l4flags. */
static __always_inline int store_addr4(struct __sk_buff *skb, int addr_off, __be32 old, __be32 new,
				       int l3csum_off, int l4csum_off, __u64 l4flags)
{
	if (l4csum_off >= 0 &&
	    bpf_l4_csum_replace(skb, l4csum_off, old, new, l4flags | BPF_F_PSEUDO_HDR | sizeof(new)))
		return -1;
	if (bpf_l3_csum_replace(skb, l3csum_off, old, new, sizeof(new)))
		return -1;
	return bpf_skb_store_bytes(skb, addr_off, &new, sizeof(new), 0);
}

/* Rewrite the IPv6 address at addr_off (no L3 checksum in IPv6), and the L4 checksum at
 * l4csum_off (if >= 0) by the pseudo-header delta. */
static __always_inline int store_addr6(struct __sk_buff *skb, int addr_off, __be32 *old, __be32 *new,
				       int l4csum_off, __u64 l4flags)
{
	if (l4csum_off >= 0) {
		__s64 diff = bpf_csum_diff(old, 16, new, 16, 0);

		if (diff < 0 || l4_csum_ipv6(skb, l4csum_off, diff, l4flags | BPF_F_PSEUDO_HDR))
			return -1;
	}
	return bpf_skb_store_bytes(skb, addr_off, new, 16, 0);
}

/* Read the 16-bit checksum field at off (for the delta a quoted-header change makes). */
static __always_inline int load_csum16(struct __sk_buff *skb, int off, struct csum16_block *out)
{
	out->zero = 0;
	return bpf_skb_load_bytes(skb, off, &out->v, sizeof(out->v));
}

/* Patch a checksum that lives in the payload (quoted in an ICMP error) for a data change given
 * as a bpf_csum_diff() delta, and add the field's own change to *outer_diff so that the ICMP
 * checksum around it can be fixed once at the end. mangled0 (a quoted UDP checksum): a result
 * of 0 is written as 0xffff, as the sender wrote it (0 would mean "no checksum"), so that the
 * quote reads exactly as the packet that was sent. */
static __always_inline int patch_quoted_csum(struct __sk_buff *skb, int off, __s64 diff, int mangled0,
					     __s64 *outer_diff)
{
	struct csum16_block before, after;

	if (load_csum16(skb, off, &before))
		return -1;
	if (bpf_l3_csum_replace(skb, off, 0, diff, 0))
		return -1;
	if (load_csum16(skb, off, &after))
		return -1;
	if (mangled0 && after.v == 0) {
		after.v = 0xffff;
		if (bpf_skb_store_bytes(skb, off, &after.v, sizeof(after.v), 0))
			return -1;
	}
	*outer_diff = bpf_csum_diff((__be32 *)&before, 4, (__be32 *)&after, 4, *outer_diff);
	return 0;
}

#endif /* __XLATE_CSUM_H */
