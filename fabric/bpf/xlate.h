/* SPDX-License-Identifier: Apache-2.0 */
/*
 * xlate.h - stateless 1:1 prefix translation of one packet, IPv4 and IPv6.
 *
 * A mapping (local CIDR, global CIDR) of this cluster is two LPM entries: global -> local in
 * xlate*_dnat (looked up by destination) and local -> global in xlate*_snat (by source). A
 * translated address keeps its host bits and takes the other prefix, so translation needs no
 * state and is its own inverse across the two directions.
 *
 * Order of work on one packet: read the IP header, look the addresses up (most packets stop
 * here: no mapping, untouched; on tunnel egress an ICMP error from an address of no mapping
 * still has its quote translated, see xlate4_quote_only), locate the L4 checksum, translate the header quoted inside an
 * ICMP error, then the outer addresses with their checksums. Everything that could make the
 * translation incomplete is checked before the first byte is written; a helper failing after
 * that drops the packet rather than forwarding it half-translated.
 */
#ifndef __XLATE_XLATE_H
#define __XLATE_XLATE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#include "consts.h"
#include "maps.h"
#include "csum.h"
#include "parsing.h"

/* Tunnel devices (vxlan) and veth/dummy devices all carry an Ethernet header. */
#define L3_OFF ETH_HLEN

static __always_inline __be32 rewrite4(__be32 addr, const struct xlate4 *x)
{
	return (addr & ~x->mask) | x->base;
}

static __always_inline void rewrite6(const __be32 *addr, const struct xlate6 *x, __be32 *out)
{
	out[0] = (addr[0] & ~x->mask[0]) | x->base[0];
	out[1] = (addr[1] & ~x->mask[1]) | x->base[1];
	out[2] = (addr[2] & ~x->mask[2]) | x->base[2];
	out[3] = (addr[3] & ~x->mask[3]) | x->base[3];
}

static __always_inline int is_udp(__u8 proto)
{
	return proto == IPPROTO_UDP || proto == IPPROTO_UDPLITE;
}

#ifdef ENABLE_ICMP_INNER
/* An address inside the header quoted by an ICMP error changes from old to new: the quoted IPv4
 * header checksum (ip_csum_off, or -1 for IPv6) and the quoted L4 checksum (l4_csum_off, -1 if
 * it was not quoted) follow, and *outer collects every byte change for the ICMP checksum. A
 * quoted UDP checksum of 0 means "none" and stays 0; one that becomes 0 is written 0xffff. */
static __always_inline int quoted_addr(struct __sk_buff *skb, int addr_off, __be32 *old, __be32 *new, int len,
				       int ip_csum_off, int l4_csum_off, __u8 proto, __s64 *outer)
{
	__s64 diff = bpf_csum_diff(old, len, new, len, 0);
	struct csum16_block cur;

	if (diff < 0)
		return -1;
	*outer = bpf_csum_diff(old, len, new, len, *outer);
	if (ip_csum_off >= 0 && patch_quoted_csum(skb, ip_csum_off, diff, 0, outer))
		return -1;
	if (l4_csum_off >= 0 && l4_csum_off + 2 <= (int)skb->len) {
		if (load_csum16(skb, l4_csum_off, &cur))
			return -1;
		if (!(is_udp(proto) && cur.v == 0) && patch_quoted_csum(skb, l4_csum_off, diff, is_udp(proto), outer))
			return -1;
	}
	return bpf_skb_store_bytes(skb, addr_off, new, len, 0);
}

/* Translate the IPv4 header quoted in the ICMP error at icmp_off. In the DNAT direction the
 * quoted packet is one this cluster sent (translated on its way out), so its *source* is one of
 * our global addresses; in the SNAT direction it is one we received, and its *destination* is one
 * of our local addresses. Returns 0 (also when nothing recognisable is quoted) or -1. */
static __always_inline int xlate_icmp4_inner(struct __sk_buff *skb, int icmp_off, int mode)
{
	int in3 = icmp_off + 8;
	struct lpm_key4 key = { .prefixlen = 32 };
	struct l4_info l4;
	struct iphdr in;
	struct xlate4 *x;
	__s64 outer = 0;
	__be32 old, new;

	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)) || in.version != 4 || in.ihl < 5)
		return 0;
	parse_l4_v4(skb, in3, &in, &l4); /* a quoted L4 checksum beyond the end is simply skipped */

	if (mode & XLATE_DNAT) {
		key.addr = in.saddr;
		x = xlate4_dnat.lookup(&key);
		if (x) {
			old = in.saddr;
			new = rewrite4(old, x);
			if (quoted_addr(skb, in3 + offsetof(struct iphdr, saddr), &old, &new, 4,
					in3 + offsetof(struct iphdr, check), l4.csum_off, l4.proto, &outer))
				return -1;
		}
	}
	if (mode & XLATE_SNAT) {
		key.addr = in.daddr;
		x = xlate4_snat.lookup(&key);
		if (x) {
			old = in.daddr;
			new = rewrite4(old, x);
			if (quoted_addr(skb, in3 + offsetof(struct iphdr, daddr), &old, &new, 4,
					in3 + offsetof(struct iphdr, check), l4.csum_off, l4.proto, &outer))
				return -1;
		}
	}
	/* ICMPv4 has no pseudo-header: a payload change, nothing for skb->csum to follow. */
	if (outer && bpf_l4_csum_replace(skb, icmp_off + 2, 0, outer, 0))
		return -1;
	return 0;
}

/* IPv6 twin of xlate_icmp4_inner. The quoted L4 checksum is fixed when the quoted header is
 * directly followed by the transport header (what Linux and routers quote for the packets we
 * forward); behind quoted extension headers only the addresses are translated. */
static __always_inline int xlate_icmp6_inner(struct __sk_buff *skb, int icmp_off, int mode)
{
	int in3 = icmp_off + 8;
	struct lpm_key6 key = { .prefixlen = 128 };
	struct ipv6hdr in;
	struct xlate6 *x;
	__s64 outer = 0;
	__be32 old[4], new[4];
	__u64 flags;
	int field, l4_csum_off = -1;

	if (bpf_skb_load_bytes(skb, in3, &in, sizeof(in)) || in.version != 6)
		return 0;
	field = l4_csum_field(in.nexthdr, 1, &flags);
	if (field >= 0)
		l4_csum_off = in3 + (int)sizeof(in) + field;

	if (mode & XLATE_DNAT) {
		__builtin_memcpy(key.addr, in.saddr.in6_u.u6_addr32, 16);
		x = xlate6_dnat.lookup(&key);
		if (x) {
			__builtin_memcpy(old, in.saddr.in6_u.u6_addr32, 16);
			rewrite6(old, x, new);
			if (quoted_addr(skb, in3 + offsetof(struct ipv6hdr, saddr), old, new, 16, -1, l4_csum_off,
					in.nexthdr, &outer))
				return -1;
		}
	}
	if (mode & XLATE_SNAT) {
		__builtin_memcpy(key.addr, in.daddr.in6_u.u6_addr32, 16);
		x = xlate6_snat.lookup(&key);
		if (x) {
			__builtin_memcpy(old, in.daddr.in6_u.u6_addr32, 16);
			rewrite6(old, x, new);
			if (quoted_addr(skb, in3 + offsetof(struct ipv6hdr, daddr), old, new, 16, -1, l4_csum_off,
					in.nexthdr, &outer))
				return -1;
		}
	}
	/* A payload change (no BPF_F_PSEUDO_HDR): the ICMPv6 sum over the packet is unchanged. */
	if (outer && bpf_l4_csum_replace(skb, icmp_off + 2, 0, outer, 0))
		return -1;
	return 0;
}
#endif /* ENABLE_ICMP_INNER */

#ifdef ENABLE_IPV4
#ifdef ENABLE_ICMP_INNER
/* Tunnel egress, outer source of no mapping: an ICMP error a node of ours sends about a packet it
 * was forwarding to one of our pods (fragmentation needed, time exceeded) quotes that packet with
 * its local destination; translate the quote so that no local address leaves the cluster and the
 * sender can match the error (PMTU discovery through our nodes). Anything else stays untouched. */
static __always_inline int xlate4_quote_only(struct __sk_buff *skb, struct iphdr *ip, int mode)
{
	struct l4_info l4;
	__u8 type = 0;

	parse_l4_v4(skb, L3_OFF, ip, &l4);
	if (l4.drop >= 0 || l4.off < 0 || bpf_skb_load_bytes(skb, l4.off, &type, 1) || !icmp4_is_error(type))
		return XLATE_UNTOUCHED;
	return xlate_icmp4_inner(skb, l4.off, mode) ? count_drop(DROP_STORE_FAILED) : XLATE_DONE;
}
#endif

static __always_inline int xlate4(struct __sk_buff *skb, int mode)
{
	struct lpm_key4 key = { .prefixlen = 32 };
	struct xlate4 dn = {}, sn = {};
	int have_dn = 0, have_sn = 0;
	struct l4_info l4;
	struct iphdr ip;
	struct xlate4 *x;

	if (bpf_skb_load_bytes(skb, L3_OFF, &ip, sizeof(ip)) || ip.version != 4 || ip.ihl < 5)
		return XLATE_UNTOUCHED; /* not a parseable IPv4 header: the stack drops it, we leave it */
	if (mode & XLATE_DNAT) {
		key.addr = ip.daddr;
		x = xlate4_dnat.lookup(&key);
		if (x) {
			dn = *x;
			have_dn = 1;
		}
	}
	if ((mode & XLATE_HAIRPIN) && !have_dn)
		return XLATE_UNTOUCHED;
	if (mode & XLATE_SNAT) {
		key.addr = ip.saddr;
		x = xlate4_snat.lookup(&key);
		if (x) {
			sn = *x;
			have_sn = 1;
		}
	}
	if (!have_dn && !have_sn) {
#ifdef ENABLE_ICMP_INNER
		if (mode == XLATE_SNAT && ip.protocol == IPPROTO_ICMP)
			return xlate4_quote_only(skb, &ip, mode);
#endif
		return XLATE_UNTOUCHED;
	}

	parse_l4_v4(skb, L3_OFF, &ip, &l4);
	if (l4.drop >= 0)
		return count_drop(l4.drop);
#ifdef ENABLE_ICMP_INNER
	if (l4.proto == IPPROTO_ICMP && l4.off >= 0) {
		__u8 type = 0;

		if (!bpf_skb_load_bytes(skb, l4.off, &type, 1) && icmp4_is_error(type) &&
		    xlate_icmp4_inner(skb, l4.off, mode))
			return count_drop(DROP_STORE_FAILED);
	}
#endif
	if (have_dn) {
		if (store_addr4(skb, L3_OFF + offsetof(struct iphdr, daddr), ip.daddr, rewrite4(ip.daddr, &dn),
				L3_OFF + offsetof(struct iphdr, check), l4.csum_off, l4.csum_flags))
			return count_drop(DROP_STORE_FAILED);
		count_xlate(skb, dn.counter);
	}
	if (have_sn) {
		if (store_addr4(skb, L3_OFF + offsetof(struct iphdr, saddr), ip.saddr, rewrite4(ip.saddr, &sn),
				L3_OFF + offsetof(struct iphdr, check), l4.csum_off, l4.csum_flags))
			return count_drop(DROP_STORE_FAILED);
		count_xlate(skb, sn.counter);
	}
	return XLATE_DONE;
}
#endif /* ENABLE_IPV4 */

#ifdef ENABLE_IPV6
#ifdef ENABLE_ICMP_INNER
/* IPv6 twin of xlate4_quote_only (the ICMPv6 header may sit behind extension headers). */
static __always_inline int xlate6_quote_only(struct __sk_buff *skb, struct ipv6hdr *ip6, int mode)
{
	struct l4_info l4;
	int dst_final;
	__u8 type = 0;

	if (ip6->nexthdr != IPPROTO_ICMPV6 && ip6->nexthdr != NEXTHDR_HOP && ip6->nexthdr != NEXTHDR_DEST &&
	    ip6->nexthdr != NEXTHDR_ROUTING && ip6->nexthdr != NEXTHDR_AUTH && ip6->nexthdr != NEXTHDR_FRAGMENT)
		return XLATE_UNTOUCHED;
	parse_l4_v6(skb, L3_OFF, ip6, &l4, &dst_final);
	if (l4.drop >= 0 || l4.off < 0 || l4.proto != IPPROTO_ICMPV6 || bpf_skb_load_bytes(skb, l4.off, &type, 1) ||
	    !icmp6_is_error(type))
		return XLATE_UNTOUCHED;
	return xlate_icmp6_inner(skb, l4.off, mode) ? count_drop(DROP_STORE_FAILED) : XLATE_DONE;
}
#endif

static __always_inline int xlate6(struct __sk_buff *skb, int mode)
{
	struct lpm_key6 key = { .prefixlen = 128 };
	struct xlate6 dn = {}, sn = {};
	int have_dn = 0, have_sn = 0, dst_final = 1;
	__be32 old[4], new[4];
	struct ipv6hdr ip6;
	struct l4_info l4;
	struct xlate6 *x;

	if (bpf_skb_load_bytes(skb, L3_OFF, &ip6, sizeof(ip6)) || ip6.version != 6)
		return XLATE_UNTOUCHED;
	if (mode & XLATE_DNAT) {
		__builtin_memcpy(key.addr, ip6.daddr.in6_u.u6_addr32, 16);
		x = xlate6_dnat.lookup(&key);
		if (x) {
			dn = *x;
			have_dn = 1;
		}
	}
	if ((mode & XLATE_HAIRPIN) && !have_dn)
		return XLATE_UNTOUCHED;
	if (mode & XLATE_SNAT) {
		__builtin_memcpy(key.addr, ip6.saddr.in6_u.u6_addr32, 16);
		x = xlate6_snat.lookup(&key);
		if (x) {
			sn = *x;
			have_sn = 1;
		}
	}
	if (!have_dn && !have_sn) {
#ifdef ENABLE_ICMP_INNER
		if (mode == XLATE_SNAT)
			return xlate6_quote_only(skb, &ip6, mode);
#endif
		return XLATE_UNTOUCHED;
	}

	parse_l4_v6(skb, L3_OFF, &ip6, &l4, &dst_final);
	if (l4.drop >= 0)
		return count_drop(l4.drop);
#ifdef ENABLE_ICMP_INNER
	if (l4.proto == IPPROTO_ICMPV6 && l4.off >= 0) {
		__u8 type = 0;

		if (!bpf_skb_load_bytes(skb, l4.off, &type, 1) && icmp6_is_error(type) &&
		    xlate_icmp6_inner(skb, l4.off, mode))
			return count_drop(DROP_STORE_FAILED);
	}
#endif
	if (have_dn) {
		/* With a routing header that has segments left, the pseudo-header carries the final
		 * destination, not this field: the L4 checksum does not depend on it. */
		__builtin_memcpy(old, ip6.daddr.in6_u.u6_addr32, 16);
		rewrite6(old, &dn, new);
		if (store_addr6(skb, L3_OFF + offsetof(struct ipv6hdr, daddr), old, new,
				dst_final ? l4.csum_off : -1, l4.csum_flags))
			return count_drop(DROP_STORE_FAILED);
		count_xlate(skb, dn.counter);
	}
	if (have_sn) {
		__builtin_memcpy(old, ip6.saddr.in6_u.u6_addr32, 16);
		rewrite6(old, &sn, new);
		if (store_addr6(skb, L3_OFF + offsetof(struct ipv6hdr, saddr), old, new, l4.csum_off, l4.csum_flags))
			return count_drop(DROP_STORE_FAILED);
		count_xlate(skb, sn.counter);
	}
	return XLATE_DONE;
}
#endif /* ENABLE_IPV6 */

/* Translate one packet in the given mode (XLATE_DNAT | XLATE_SNAT | XLATE_HAIRPIN). */
static __always_inline int xlate(struct __sk_buff *skb, int mode)
{
#ifdef ENABLE_IPV4
	if (skb->protocol == xl_htons(ETH_P_IP))
		return xlate4(skb, mode);
#endif
#ifdef ENABLE_IPV6
	if (skb->protocol == xl_htons(ETH_P_IPV6))
		return xlate6(skb, mode);
#endif
	return XLATE_UNTOUCHED;
}

#endif /* __XLATE_XLATE_H */
