/* SPDX-License-Identifier: Apache-2.0 */
/*
 * parsing.h - where the L4 checksum (if any) of an IPv4/IPv6 packet is.
 *
 * Headers are read with bpf_skb_load_bytes() rather than direct packet access: the header quoted
 * in an ICMP error and the L4 header behind IPv6 extension headers may sit outside the linear
 * area of the skb, and a copy keeps the verifier happy with variable offsets.
 */
#ifndef __XLATE_PARSING_H
#define __XLATE_PARSING_H

#include "consts.h"

/* What translation needs to know about the transport header of one packet. */
struct l4_info {
	int off;          /* offset of the L4 header, -1 if there is none (non-first fragment) */
	int csum_off;     /* offset of its pseudo-header checksum, -1 if none or not ours to fix */
	__u64 csum_flags; /* extra bpf_l4_csum_replace flags (BPF_F_MARK_MANGLED_0 for UDP) */
	__u8 proto;       /* IPPROTO_* of the L4 header */
	int drop;         /* >= 0: DROP_* reason if this packet matches a mapping */
};

/* Offset of the pseudo-header checksum of a protocol inside its header, or -1. The protocol
 * numbers are per family: ICMPv6 (58) has a pseudo-header checksum in IPv6 only; in IPv4 it is
 * an unknown protocol like any other (addresses only, its bytes untouched). */
static __always_inline int l4_csum_field(__u8 proto, int v6, __u64 *flags)
{
	*flags = 0;
	if (proto == IPPROTO_ICMPV6 && !v6)
		return -1;
	switch (proto) {
	case IPPROTO_TCP:
		return 16;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
		/* A UDP checksum of 0 means none (IPv4; in IPv6 only for tunnels, RFC 6935): leave it 0
		 * in both families (a bad packet stays exactly as bad); a result of 0 is sent as 0xffff. */
		*flags = BPF_F_MARK_MANGLED_0;
		return 6;
	case IPPROTO_DCCP:
		return 6;
	case IPPROTO_ICMPV6:
		return 2;
	}
	return -1; /* ICMPv4 (no pseudo-header), SCTP (CRC32c without addresses), ESP, GRE, ... */
}

/* Fill *l4 for the transport header at off; the checksum field must be inside the packet. */
static __always_inline void l4_locate(struct __sk_buff *skb, __u8 proto, int v6, int off, struct l4_info *l4)
{
	int field = l4_csum_field(proto, v6, &l4->csum_flags);

	l4->proto = proto;
	l4->off = off;
	l4->csum_off = field >= 0 ? off + field : -1;
	if (l4->csum_off >= 0 && l4->csum_off + 2 > (int)skb->len)
		l4->drop = DROP_L4_TRUNCATED;
	/* The family's ICMP needs its 8-byte header to be told error from echo (the kernel drops a
	 * shorter one too). ICMPv4 in IPv6 and ICMPv6 in IPv4 are unknown protocols, not checked. */
	if (proto == (v6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP) && off + 8 > (int)skb->len)
		l4->drop = DROP_L4_TRUNCATED;
}

/* IPv4: the L4 header follows the options unless this is a non-first fragment. */
static __always_inline void parse_l4_v4(struct __sk_buff *skb, int l3, struct iphdr *ip, struct l4_info *l4)
{
	l4->off = -1;
	l4->csum_off = -1;
	l4->csum_flags = 0;
	l4->proto = ip->protocol;
	l4->drop = -1;
	if (ip->frag_off & xl_htons(IP_OFFSET))
		return; /* non-first fragment: addresses only, its bytes are covered by the first's csum */
	l4_locate(skb, ip->protocol, 0, l3 + ip->ihl * 4, l4);
}

/* IPv6: walk up to XLATE_MAX_EXTHDRS extension headers. *dst_final is cleared when a routing
 * header still has segments left (the destination field is then not the pseudo-header's). */
static __always_inline void parse_l4_v6(struct __sk_buff *skb, int l3, struct ipv6hdr *ip6, struct l4_info *l4,
					int *dst_final)
{
	__u8 nexthdr = ip6->nexthdr;
	int off = l3 + sizeof(*ip6);
	int i;

	l4->off = -1;
	l4->csum_off = -1;
	l4->csum_flags = 0;
	l4->proto = nexthdr;
	l4->drop = -1;
	*dst_final = 1;

#pragma unroll
	for (i = 0; i < XLATE_MAX_EXTHDRS; i++) {
		__u8 hdr[8];

		switch (nexthdr) {
		case NEXTHDR_HOP:
		case NEXTHDR_DEST:
		case NEXTHDR_ROUTING:
		case NEXTHDR_AUTH:
		case NEXTHDR_FRAGMENT:
			break;
		default:
			l4_locate(skb, nexthdr, 1, off, l4);
			return;
		}
		if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr))) {
			l4->drop = DROP_L4_TRUNCATED;
			return;
		}
		if (nexthdr == NEXTHDR_FRAGMENT) {
			__u16 frag = ((__u16)hdr[2] << 8) | hdr[3];

			nexthdr = hdr[0];
			off += 8;
			if (frag & IP6_OFFSET_MASK) {
				l4->proto = nexthdr;
				return; /* non-first fragment: no L4 header here */
			}
			continue;
		}
		if (nexthdr == NEXTHDR_ROUTING && hdr[3] != 0)
			*dst_final = 0;
		if (nexthdr == NEXTHDR_AUTH)
			off += ((int)hdr[1] + 2) * 4;
		else
			off += ((int)hdr[1] + 1) * 8;
		nexthdr = hdr[0];
	}
	if (nexthdr == NEXTHDR_HOP || nexthdr == NEXTHDR_DEST || nexthdr == NEXTHDR_ROUTING ||
	    nexthdr == NEXTHDR_AUTH || nexthdr == NEXTHDR_FRAGMENT)
		l4->drop = DROP_EXTHDR_LIMIT;
	else
		l4_locate(skb, nexthdr, 1, off, l4);
}

/* ICMP types that quote the offending packet's header after the 8-byte ICMP header. */
static __always_inline int icmp4_is_error(__u8 type)
{
	return type == 3 /* dest unreachable */ || type == 4 /* source quench */ || type == 5 /* redirect */ ||
	       type == 11 /* time exceeded */ || type == 12 /* parameter problem */;
}

static __always_inline int icmp6_is_error(__u8 type)
{
	return type >= 1 && type <= 4; /* dest unreachable, packet too big, time exceeded, param problem */
}

#endif /* __XLATE_PARSING_H */
