/* SPDX-License-Identifier: Apache-2.0 */
/*
 * maps.h - the translator's maps. All are pinned under PIN_DIR so that an agent restart (a new
 * process that compiles and attaches new programs) reuses them: mappings stay loaded and counters
 * keep counting. The Python side mirrors every struct in fabric/bpf/translate.py (_Key4, _Xlate4,
 * ...) and checks a reused pin against these definitions before compiling.
 */
#ifndef __XLATE_MAPS_H
#define __XLATE_MAPS_H

#include "consts.h"

/* LPM trie keys: prefix length in bits, then the address in network byte order. */
struct lpm_key4 {
	__u32 prefixlen;
	__be32 addr;
};

struct lpm_key6 {
	__u32 prefixlen;
	__be32 addr[4];
};

/* Translation target: the packet address becomes (addr & ~mask) | base, i.e. the host part is
 * kept and the prefix is swapped (1:1, same prefix length on both sides). counter is the slot of
 * this entry in xlate_stats. */
struct xlate4 {
	__be32 base;
	__be32 mask;
	__u32 counter;
	__u32 pad;
};

struct xlate6 {
	__be32 base[4];
	__be32 mask[4];
	__u32 counter;
	__u32 pad;
};

/* Per-entry packet and byte counters (skb->len, i.e. including the Ethernet header). */
struct xlate_stat {
	__u64 packets;
	__u64 bytes;
};

/* map, global CIDR -> local CIDR of this cluster's IPv4 mappings: looked up by destination
 * (tunnel ingress, hairpin) */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key4, struct xlate4, xlate4_dnat, XLATE_MAX_MAPPINGS,
		 PIN_DIR "/xlate4_dnat", BPF_F_NO_PREALLOC);
/* map, local CIDR -> global CIDR of this cluster's IPv4 mappings: looked up by source
 * (tunnel egress, hairpin) */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key4, struct xlate4, xlate4_snat, XLATE_MAX_MAPPINGS,
		 PIN_DIR "/xlate4_snat", BPF_F_NO_PREALLOC);
/* map, global CIDR -> local CIDR of this cluster's IPv6 mappings (by destination) */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key6, struct xlate6, xlate6_dnat, XLATE_MAX_MAPPINGS,
		 PIN_DIR "/xlate6_dnat", BPF_F_NO_PREALLOC);
/* map, local CIDR -> global CIDR of this cluster's IPv6 mappings (by source) */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key6, struct xlate6, xlate6_snat, XLATE_MAX_MAPPINGS,
		 PIN_DIR "/xlate6_snat", BPF_F_NO_PREALLOC);
/* map, per-CPU packet/byte counters, one slot per LPM entry (xlate4/xlate6 .counter); the loader
 * allocates slots and zeroes a slot before reusing it */
BPF_TABLE_PINNED("percpu_array", __u32, struct xlate_stat, xlate_stats, XLATE_MAX_COUNTERS,
		 PIN_DIR "/xlate_stats");
/* map, per-CPU count of dropped packets by reason (DROP_* in consts.h) */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, xlate_drops, DROP_MAX, PIN_DIR "/xlate_drops");

static __always_inline void count_xlate(struct __sk_buff *skb, __u32 slot)
{
	struct xlate_stat *st = xlate_stats.lookup(&slot);

	if (st) {
		st->packets += 1;
		st->bytes += skb->len;
	}
}

static __always_inline int count_drop(__u32 reason)
{
	__u64 *n = xlate_drops.lookup(&reason);

	if (n)
		*n += 1;
	return XLATE_DROP;
}

#endif /* __XLATE_MAPS_H */
