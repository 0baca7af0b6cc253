/* SPDX-License-Identifier: Apache-2.0
 *
 * The offload stages' rules in C, shared by the two compiled parts of the udp
 * backend: _offload.c (one Python call per stage) and _lane.c (the fast lane's
 * thread, which runs the same stages on the bulk path with no Python at all).
 * One copy of each rule; offload_python.py states them and the tests hold both
 * users to it.
 *
 * No Python here: lengths are ssize_t (Py_ssize_t on Linux), and a stage that
 * meets lengths it cannot honour says so by its result, for the caller to turn
 * into ValueError (_offload) or a handover to the Python loop (_lane).
 */
#ifndef FLANNELD_OFFLOAD_STAGES_H
#define FLANNELD_OFFLOAD_STAGES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_CWR 0x80

static inline uint16_t get16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t get32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}

/* Sum of a region's little-endian 16-bit words (an odd last byte as a word
 * of its own, low byte), added to acc. The ones'-complement sum does not
 * depend on byte order, so folding this and swapping the two bytes gives
 * the big-endian sum; 32-bit loads let the compiler vectorise the loop. */
static inline uint64_t sum_le(const uint8_t *p, size_t len, uint64_t acc) {
    while (len >= 4) {
        uint32_t word;
        memcpy(&word, p, 4);
        acc += word;
        p += 4;
        len -= 4;
    }
    if (len >= 2) {
        uint16_t word;
        memcpy(&word, p, 2);
        acc += word;
        p += 2;
        len -= 2;
    }
    if (len)
        acc += *p;
    return acc;
}

/* A little-endian-domain sum folded to 16 bits and returned in network
 * order, as core.packet.fold: a non-zero multiple of 0xFFFF is 0xFFFF. */
static inline uint32_t fold_be(uint64_t acc) {
    while (acc >> 16)
        acc = (acc & 0xFFFF) + (acc >> 16);
    return (uint32_t)(((acc & 0xFF) << 8) | (acc >> 8));
}

static inline uint32_t checksum(const uint8_t *p, size_t len, uint64_t acc) {
    return 0xFFFF - fold_be(sum_le(p, len, acc));
}

/* The TCP/UDP pseudo-header (addresses, protocol, length) as a sum. */
static inline uint64_t pseudo_sum(const uint8_t *ip, uint8_t proto, uint32_t l4_len) {
    uint8_t pseudo[12];
    memcpy(pseudo, ip + 12, 8);
    pseudo[8] = 0;
    pseudo[9] = proto;
    put16(pseudo + 10, l4_len);
    return sum_le(pseudo, sizeof pseudo, 0);
}

/* The IPv6 pseudo-header (addresses, upper-layer length, next header) as a sum. */
static inline uint64_t pseudo_sum6(const uint8_t *ip, uint8_t proto, uint32_t l4_len) {
    uint8_t tail[8] = {0};
    put32(tail, l4_len);
    tail[7] = proto;
    return sum_le(ip + 8, 32, sum_le(tail, sizeof tail, 0));
}

/* --- segmentation (egress) --------------------------------------------------- */

/* The header lengths of a TCP/IPv4 super-packet p[:n] to split at mss: NULL with
 * *ip_len and *hlen set, or what is wrong (as offload_python.segment_tcp4 checks). */
static const char *tcp4_headers(const uint8_t *p, ssize_t n, ssize_t mss, ssize_t *ip_len, ssize_t *hlen) {
    if (n < 40 || mss < 1 || mss > 0xFFFF)
        return "segment_tcp4: packet or MSS out of range";
    *ip_len = (p[0] & 0x0F) * 4;
    if (*ip_len < 20 || *ip_len + 20 > n)
        return "segment_tcp4: bad IP header length";
    ssize_t tcp_len = (p[*ip_len + 12] >> 4) * 4;
    *hlen = *ip_len + tcp_len;
    if (tcp_len < 20 || *hlen > n)
        return "segment_tcp4: bad TCP header length";
    return NULL;
}

/* How a super-packet of n bytes with headers of hlen splits at mss. */
struct split {
    ssize_t count, seglen, full, last_payload, total;
};

/* The split of p[:n], or 0 when its segments would not fit room bytes or the IP length field. */
static int plan_split(ssize_t n, ssize_t mss, ssize_t hlen, ssize_t room, struct split *s) {
    ssize_t payload = n - hlen;
    s->count = payload > 0 ? (payload + mss - 1) / mss : 1;
    s->seglen = hlen + mss;
    s->full = s->count - 1;
    s->last_payload = payload - s->full * mss;
    s->total = s->full * s->seglen + hlen + s->last_payload;
    return !(s->total > room || hlen + s->last_payload > 0xFFFF || (s->full && s->seglen > 0xFFFF));
}

/* Split p (TCP at ip_len, headers of hlen bytes) as planned into segments back to
 * back in out, for both families (six: IPv6, whose segments get a payload length and
 * no id or header checksum), as offload_python._segment. */
static void split_segments(const uint8_t *p, ssize_t mss, ssize_t ip_len, ssize_t hlen, int six, const struct split *s,
                           uint8_t *out) {
    uint8_t flags = p[ip_len + 13];
    uint32_t ident = get16(p + 4), seq = get32(p + ip_len + 4);
    for (ssize_t i = 0; i < s->count; i++) {
        uint8_t *seg = out + i * s->seglen;
        ssize_t length = hlen + (i < s->full ? mss : s->last_payload);
        memcpy(seg, p, hlen);
        memcpy(seg + hlen, p + hlen + i * mss, length - hlen);
        uint8_t keep = 0xFF;
        if (i > 0)
            keep &= (uint8_t)~TCP_CWR; /* CWR on the first segment only */
        if (i < s->full)
            keep &= (uint8_t)~(TCP_FIN | TCP_PSH); /* FIN and PSH on the last only */
        seg[ip_len + 13] = flags & keep;
        if (six) {
            put16(seg + 4, (uint32_t)(length - 40));
        } else {
            put16(seg + 2, (uint32_t)length);
            put16(seg + 4, (ident + (uint32_t)i) & 0xFFFF);
            put16(seg + 10, 0);
            put16(seg + 10, checksum(seg, ip_len, 0));
        }
        put32(seg + ip_len + 4, seq + (uint32_t)(i * mss));
        put16(seg + ip_len + 16, 0);
        uint32_t l4_len = (uint32_t)(length - ip_len);
        uint64_t pseudo = six ? pseudo_sum6(seg, 6, l4_len) : pseudo_sum(seg, 6, l4_len);
        put16(seg + ip_len + 16, checksum(seg + ip_len, length - ip_len, pseudo));
    }
}

/* --- flow runs and merging (ingress) ------------------------------------------ */

/* Byte ranges of a TCP/IPv4 header (no IP options) that every segment of
 * one flow shares: all but length, id, IP checksum, sequence number, flags
 * and TCP checksum (as offload_python._FIXED_RANGES); and of a TCP/IPv6
 * header (no extension headers): all but payload length, sequence number,
 * flags and TCP checksum (_FIXED_RANGES6). */
static const int fixed_ranges[][2] = {{0, 2}, {6, 10}, {12, 24}, {28, 33}, {34, 36}};
static const int fixed_ranges6[][2] = {{0, 4}, {6, 44}, {48, 53}, {54, 56}};

/* Where a plain TCP/IPv4 or TCP/IPv6 header keeps what the ingress stages
 * read and write (as offload_python._Layout); TCP starts at ip_len. */
struct layout {
    const char *merge_error, *extend_error;
    ssize_t ip_len;
    const int (*fixed)[2];
    size_t nfixed;
    int length_at; /* IPv4's total length, IPv6's payload length */
    int six;
};
static const struct layout V4 = {"merge_tcp4: batch lengths out of range", "extend_tcp4: lengths out of range", 20,
                                 fixed_ranges, sizeof fixed_ranges / sizeof fixed_ranges[0], 2, 0};
static const struct layout V6 = {"merge_tcp6: batch lengths out of range", "extend_tcp6: lengths out of range", 40,
                                 fixed_ranges6, sizeof fixed_ranges6 / sizeof fixed_ranges6[0], 4, 1};

/* What the IP length field holds for a datagram of length bytes. */
static inline ssize_t length_field(const struct layout *l, ssize_t length) {
    return l->six ? length - l->ip_len : length;
}

/* Whether two headers of hlen bytes belong to one flow (the urgent pointer
 * and TCP options, from ip_len + 18, compared too). */
static int same_flow(const uint8_t *a, const uint8_t *b, ssize_t hlen, const struct layout *l) {
    for (size_t r = 0; r < l->nfixed; r++)
        if (memcmp(a + l->fixed[r][0], b + l->fixed[r][0], (size_t)(l->fixed[r][1] - l->fixed[r][0])))
            return 0;
    ssize_t options = l->ip_len + 18;
    return !memcmp(a + options, b + options, (size_t)(hlen - options));
}

/* A plain TCP/IPv4 header (no options, not a fragment) or TCP/IPv6 header
 * (no extension headers): the only ones the stages merge. */
static int plain_tcp(const uint8_t *b, const struct layout *l) {
    if (l->six)
        return b[6] == 6;
    return b[0] == 0x45 && b[9] == 6 && !(b[6] & 0x3F) && !b[7];
}

/* Lengths a caller may pass for a batch of count datagrams of seglen bytes
 * (the last shorter) in a buffer of size bytes: small enough not to
 * overflow, and total within the buffer. */
static int batch_fits(ssize_t count, ssize_t seglen, ssize_t total, ssize_t size) {
    return count >= 0 && count <= 0x10000 && seglen >= 0 && seglen <= 0x10000 && total >= 0 && total <= size;
}

static int ip_header_valid(const uint8_t *h) { return sum_le(h, 20, 0) % 0xFFFF == 0; }

/* How many leading datagrams of a batch (lengths checked by batch_fits) are
 * in-order segments of one plain TCP flow, IPv4 or IPv6, and their header length
 * (both 0 for none), as offload_python.tcp_flow_run; a PSH ends the run. */
static void flow_run(const uint8_t *b, ssize_t count, ssize_t seglen, ssize_t total, ssize_t *hlen, ssize_t *run) {
    *hlen = *run = 0;
    ssize_t full = count - 1, last_len = total - full * seglen;
    if (count < 1 || seglen < 40 || last_len < 40)
        return;
    const struct layout *l = b[0] >> 4 == 6 ? &V6 : &V4;
    ssize_t tcp = l->ip_len, shortest = tcp + 20;
    if (seglen < shortest || last_len < shortest || !plain_tcp(b, l))
        return;
    ssize_t data_offset = b[tcp + 12] >> 4;
    if (data_offset < 5)
        return;
    ssize_t candidate = tcp + data_offset * 4, mss = seglen - candidate;
    if (mss <= 0 || last_len <= candidate)
        return;
    uint32_t seq0 = get32(b + tcp + 4);
    for (ssize_t i = 0; i < count; i++) {
        const uint8_t *h = b + i * seglen;
        if (i > 0 && !same_flow(b, h, candidate, l))
            break;
        uint8_t flags = h[tcp + 13];
        if (flags != TCP_ACK && flags != (TCP_ACK | TCP_PSH))
            break;
        if (get16(h + l->length_at) != length_field(l, i < full ? seglen : last_len))
            break;
        if (!l->six && !ip_header_valid(h))
            break;
        if (get32(h + tcp + 4) != seq0 + (uint32_t)(i * mss))
            break;
        *run = i + 1;
        if (flags & TCP_PSH)
            break;
    }
    if (*run)
        *hlen = candidate;
}

/* The header of a merged super-packet: the last segment's flags (PSH), its
 * length, the IPv4 checksum, and for CHECKSUM_PARTIAL the pseudo-header sum
 * that the kernel completes. */
static void finish_merged(uint8_t *packet, uint8_t flags, ssize_t length, const struct layout *l) {
    ssize_t tcp = l->ip_len;
    packet[tcp + 13] = flags;
    put16(packet + l->length_at, (uint32_t)length_field(l, length));
    uint64_t pseudo;
    if (l->six) {
        pseudo = pseudo_sum6(packet, 6, (uint32_t)(length - tcp));
    } else {
        put16(packet + 10, 0);
        put16(packet + 10, checksum(packet, 20, 0));
        pseudo = pseudo_sum(packet, 6, (uint32_t)(length - tcp));
    }
    put16(packet + tcp + 16, fold_be(pseudo));
}

/* The payloads of a run's segments, back to back from dest. */
static void copy_payloads(const uint8_t *b, ssize_t count, ssize_t seglen, ssize_t total, ssize_t hlen, uint8_t *dest) {
    ssize_t full = count - 1, mss = seglen - hlen;
    for (ssize_t i = 0; i < full; i++, dest += mss)
        memcpy(dest, b + i * seglen + hlen, (size_t)mss);
    memcpy(dest, b + full * seglen + hlen, (size_t)(total - full * seglen - hlen));
}

/* Write a run (checked by flow_run, lengths by batch_fits) as one super-packet into
 * out: its length, or 0 when the lengths do not make one that fits (as offload_python.merge). */
static ssize_t merge_run(const uint8_t *b, ssize_t count, ssize_t seglen, ssize_t total, ssize_t hlen, uint8_t *out,
                         ssize_t room, const struct layout *l) {
    ssize_t full = count - 1, mss = seglen - hlen, length = total - full * hlen;
    if (count < 2 || hlen < l->ip_len + 20 || mss <= 0 || total - full * seglen <= hlen || length > 0xFFFF
        || length > room)
        return 0;
    memcpy(out, b, (size_t)hlen);
    copy_payloads(b, count, seglen, total, hlen, out + hlen);
    finish_merged(out, b[full * seglen + l->ip_len + 13], length, l);
    return length;
}

/* Whether extend_run may be asked about these lengths (else a caller's error). */
static int extend_fits(ssize_t count, ssize_t seglen, ssize_t total, ssize_t hlen, ssize_t used, ssize_t room,
                       const struct layout *l) {
    ssize_t full = count - 1, mss = seglen - hlen, tcp = l->ip_len;
    return count >= 1 && hlen >= tcp + 20 && hlen <= tcp + 60 && mss > 0 && total - full * seglen > hlen
           && used >= hlen && used <= room;
}

/* Append a run (checked by flow_run, lengths by extend_fits) to the super-packet in
 * out[:used], when the run continues it: the same flow header, the next sequence
 * number, whole segments so far, no PSH yet, and room under the IP length limit
 * (as offload_python._extend). The new length, or 0. */
static ssize_t extend_run(const uint8_t *b, ssize_t count, ssize_t seglen, ssize_t total, ssize_t hlen, uint8_t *out,
                          ssize_t room, ssize_t used, const struct layout *l) {
    ssize_t full = count - 1, mss = seglen - hlen, tcp = l->ip_len;
    ssize_t merged_payload = used - hlen, grown_length = used + total - count * hlen;
    if (merged_payload % mss || out[tcp + 13] != TCP_ACK || grown_length > 0xFFFF || grown_length > room)
        return 0;
    if (!same_flow(out, b, hlen, l) || get32(b + tcp + 4) != get32(out + tcp + 4) + (uint32_t)merged_payload)
        return 0;
    copy_payloads(b, count, seglen, total, hlen, out + used);
    finish_merged(out, b[full * seglen + tcp + 13], grown_length, l);
    return grown_length;
}

/* Every datagram of a batch (lengths checked by batch_fits) a plain IPv4 header (no
 * options) with the right length and checksum, its source in src_net and its
 * destination in dst_net (as offload_python.plain_ipv4_batch). */
static int plain_ipv4(const uint8_t *b, ssize_t count, ssize_t seglen, ssize_t total, uint32_t src_net,
                      uint32_t dst_net, uint32_t mask) {
    ssize_t full = count - 1, last_len = total - full * seglen;
    if (count < 1 || seglen < 20 || last_len < 20)
        return 0;
    for (ssize_t i = 0; i < count; i++) {
        const uint8_t *h = b + i * seglen;
        if (h[0] != 0x45 || get16(h + 2) != (i < full ? seglen : last_len) || !ip_header_valid(h))
            return 0;
        if ((get32(h + 12) & mask) != src_net || (get32(h + 16) & mask) != dst_net)
            return 0;
    }
    return 1;
}

/* --- checksum completion (egress) --------------------------------------------- */

/* Whether complete_partial may finish p[:n] with these offsets. */
static int partial_fits(ssize_t n, ssize_t start, ssize_t offset) {
    return start >= 0 && start <= n && offset >= 0 && start + offset + 2 <= n;
}

/* Finish a CHECKSUM_PARTIAL packet whose checksum field holds the pseudo-header
 * sum (offsets checked by partial_fits); UDP sends a computed 0 as 0xFFFF. */
static void complete_partial(uint8_t *p, ssize_t n, ssize_t start, ssize_t offset, int udp) {
    uint32_t value = checksum(p + start, (size_t)(n - start), 0);
    if (udp && value == 0)
        value = 0xFFFF;
    put16(p + start + offset, value);
}

#endif
