/* SPDX-License-Identifier: Apache-2.0 */
/*
 * consts.h - compile-time features, sizes and protocol constants of the global-IP translator.
 *
 * Every feature is a -D cflag set by the loader (fabric/bpf/translate.py, _cflags()); each one
 * below says what it controls. Sizes can be overridden the same way (#ifndef).
 */
#ifndef __XLATE_CONSTS_H
#define __XLATE_CONSTS_H

/* ENABLE_IPV4 / ENABLE_IPV6: translate that family. A disabled family passes untouched. */
/* ENABLE_ICMP_INNER: translate the header quoted inside ICMP/ICMPv6 errors (PMTU discovery,
 * traceroute). Without it only the outer header of an error is translated. */
/* ENABLE_CSUM_IPV6_FLAG: pass BPF_F_IPV6 to bpf_l4_csum_replace for IPv6 address changes so that
 * a CHECKSUM_COMPLETE skb->csum is not adjusted (the address and L4 checksum changes cancel out in
 * IPv6, which has no header checksum). Kernels before the flag existed return -EINVAL for it; the
 * code then retries without it (csum.h), so the flag is safe to leave on. */

/* PIN_DIR: bpffs directory of this instance's maps, e.g. "/sys/fs/bpf/kosmos-fabric/node-a".
 * Mandatory: maps must outlive the agent so a restart neither drops packets nor resets counters. */
#ifndef PIN_DIR
#error "PIN_DIR must be defined (-DPIN_DIR=\"/sys/fs/bpf/kosmos-fabric/<instance>\")"
#endif

/* Maximum number of mappings per family and direction (LPM entries). */
#ifndef XLATE_MAX_MAPPINGS
#define XLATE_MAX_MAPPINGS 1024
#endif
/* Counter slots: one per LPM entry of every map (2 directions x 2 families). */
#define XLATE_MAX_COUNTERS (4 * XLATE_MAX_MAPPINGS)

/* IPv6 extension headers walked before giving up (bounded loop for the verifier). */
#ifndef XLATE_MAX_EXTHDRS
#define XLATE_MAX_EXTHDRS 6
#endif

/* Not in the 6.1 UAPI headers bcc compiles against; value from include/uapi/linux/bpf.h. */
#define XLATE_F_IPV6 (1ULL << 7)

/* Translation directions, used as flags by xlate.h:
 *   XLATE_DNAT: destination global -> local (the xlate*_dnat maps), quoted source likewise;
 *   XLATE_SNAT: source local -> global (the xlate*_snat maps), quoted destination likewise. */
#define XLATE_DNAT 1
#define XLATE_SNAT 2
/* XLATE_HAIRPIN: translate the source only if the destination was translated (see hairpin.bpf.c). */
#define XLATE_HAIRPIN 4

/* Results of xlate() (xlate.h) before the entry point turns them into a tc verdict. */
#define XLATE_UNTOUCHED 0
#define XLATE_DONE 1
#define XLATE_DROP 2

/* Drop reasons (index into the xlate_drops map; the loader names them in DROP_REASONS). A packet
 * that matches a mapping but cannot be translated completely is dropped, never forwarded
 * half-translated: an untranslated local source would collide with the peer cluster's own
 * (overlapping) addresses, and a stale L4 checksum is a corruption. */
/* DROP_L4_TRUNCATED: a translatable L4 protocol whose checksum field is not in the packet, an ICMP
 * (ICMPv6) header shorter than its 8 bytes, or an IPv6 extension header that is not there */
#define DROP_L4_TRUNCATED 0
#define DROP_STORE_FAILED 1   /* a store/checksum helper failed (e.g. unwritable clone) */

#define DROP_EXTHDR_LIMIT 2   /* more than XLATE_MAX_EXTHDRS IPv6 extension headers before L4 */
#define DROP_MAX 3

/* Byte order of constants compared with packet fields (the BPF target is little-endian on x86). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define xl_htons(x) ((__u16)__builtin_bswap16(x))
#define xl_ntohs(x) ((__u16)__builtin_bswap16(x))
#else
#define xl_htons(x) ((__u16)(x))
#define xl_ntohs(x) ((__u16)(x))
#endif

#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define IP6_OFFSET_MASK 0xFFF8   /* fragment offset bits of ip6_frag.frag_off (host order) */

#ifndef IPPROTO_UDPLITE
#define IPPROTO_UDPLITE 136
#endif
#ifndef IPPROTO_DCCP
#define IPPROTO_DCCP 33
#endif
#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_NONE 59
#define NEXTHDR_DEST 60

#endif /* __XLATE_CONSTS_H */
