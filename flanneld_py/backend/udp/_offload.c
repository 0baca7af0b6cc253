/* SPDX-License-Identifier: Apache-2.0
 *
 * flanneld_py.backend.udp._offload: the compiled build of the offload
 * stages (segmentation, flow checks, merging, checksum completion).
 *
 * Same functions, arguments, results and bytes as the pure-Python
 * reference in offload_python.py, which states the rules and which the
 * tests hold this module to. Why a compiled build: per 64 KB super-packet
 * the reference works segment by segment in the interpreter; here each
 * stage is one call that touches each byte once or twice.
 *
 * Every function checks its lengths against the buffers it was given and
 * raises ValueError instead of reading or writing outside them: the
 * buffers hold packets from the network and from local pods.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static PyObject *fail(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* Split packet[:n] (TCP at ip_len, headers of hlen bytes) into mss-sized
 * segments back to back in out, for both families (six: IPv6, whose
 * segments get a payload length and no id or header checksum), as
 * offload_python._segment. Returns (total, segment_len, count) or NULL with
 * ValueError set. */
static PyObject *segment(const uint8_t *p, Py_ssize_t n, Py_ssize_t mss, Py_buffer *out, Py_ssize_t ip_len,
                         Py_ssize_t hlen, int six) {
    uint8_t *o = out->buf;
    Py_ssize_t payload = n - hlen;
    Py_ssize_t count = payload > 0 ? (payload + mss - 1) / mss : 1;
    Py_ssize_t seglen = hlen + mss;
    Py_ssize_t full = count - 1;
    Py_ssize_t last_payload = payload - full * mss;
    Py_ssize_t total = full * seglen + hlen + last_payload;
    if (total > out->len || hlen + last_payload > 0xFFFF || (full && seglen > 0xFFFF))
        return fail(six ? "segment_tcp6: output buffer too small" : "segment_tcp4: output buffer too small");
    uint8_t flags = p[ip_len + 13];
    uint32_t ident = get16(p + 4), seq = get32(p + ip_len + 4);
    for (Py_ssize_t i = 0; i < count; i++) {
        uint8_t *seg = o + i * seglen;
        Py_ssize_t length = hlen + (i < full ? mss : last_payload);
        memcpy(seg, p, hlen);
        memcpy(seg + hlen, p + hlen + i * mss, length - hlen);
        uint8_t keep = 0xFF;
        if (i > 0)
            keep &= (uint8_t)~TCP_CWR; /* CWR on the first segment only */
        if (i < full)
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
    return Py_BuildValue("nnn", total, seglen, count);
}

/* segment_tcp4(packet, n, mss, out) -> (total, segment_len, count) */
static PyObject *segment_tcp4(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t n, mss;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnw*", &in, &n, &mss, &out))
        return NULL;
    const uint8_t *p = in.buf;
    if (n < 40 || n > in.len || mss < 1 || mss > 0xFFFF) {
        fail("segment_tcp4: packet or MSS out of range");
        goto done;
    }
    Py_ssize_t ip_len = (p[0] & 0x0F) * 4;
    if (ip_len < 20 || ip_len + 20 > n) {
        fail("segment_tcp4: bad IP header length");
        goto done;
    }
    Py_ssize_t tcp_len = (p[ip_len + 12] >> 4) * 4;
    Py_ssize_t hlen = ip_len + tcp_len;
    if (tcp_len < 20 || hlen > n) {
        fail("segment_tcp4: bad TCP header length");
        goto done;
    }
    result = segment(p, n, mss, &out, ip_len, hlen, 0);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

/* segment_tcp6(packet, n, mss, out) -> (total, segment_len, count): a plain
 * TCP/IPv6 super-packet (no extension headers), as offload_python.segment_tcp6. */
static PyObject *segment_tcp6(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t n, mss;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnw*", &in, &n, &mss, &out))
        return NULL;
    const uint8_t *p = in.buf;
    if (n < 60 || n > in.len || mss < 1 || mss > 0xFFFF) {
        fail("segment_tcp6: packet or MSS out of range");
        goto done;
    }
    if (p[0] >> 4 != 6 || p[6] != 6) {
        fail("segment_tcp6: not a plain TCP/IPv6 packet");
        goto done;
    }
    Py_ssize_t hlen = 40 + (p[52] >> 4) * 4;
    if (hlen < 60 || hlen > n) {
        fail("segment_tcp6: bad TCP header length");
        goto done;
    }
    result = segment(p, n, mss, &out, 40, hlen, 1);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

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
    Py_ssize_t ip_len;
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
static inline Py_ssize_t length_field(const struct layout *l, Py_ssize_t length) {
    return l->six ? length - l->ip_len : length;
}

/* Whether two headers of hlen bytes belong to one flow (the urgent pointer
 * and TCP options, from ip_len + 18, compared too). */
static int same_flow(const uint8_t *a, const uint8_t *b, Py_ssize_t hlen, const struct layout *l) {
    for (size_t r = 0; r < l->nfixed; r++)
        if (memcmp(a + l->fixed[r][0], b + l->fixed[r][0], l->fixed[r][1] - l->fixed[r][0]))
            return 0;
    Py_ssize_t options = l->ip_len + 18;
    return !memcmp(a + options, b + options, hlen - options);
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
static int batch_fits(Py_ssize_t count, Py_ssize_t seglen, Py_ssize_t total, Py_ssize_t size) {
    return count >= 0 && count <= 0x10000 && seglen >= 0 && seglen <= 0x10000 && total >= 0 && total <= size;
}

static int ip_header_valid(const uint8_t *h) { return sum_le(h, 20, 0) % 0xFFFF == 0; }

/* tcp_flow_run(batch, count, seglen, total) -> (header length, run) or (0, 0):
 * how many leading datagrams are in-order segments of one plain TCP flow,
 * IPv4 or IPv6 (as offload_python.tcp_flow_run; a PSH ends the run). */
static PyObject *tcp_flow_run(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t count, seglen, total, hlen = 0, run = 0;
    if (!PyArg_ParseTuple(args, "y*nnn", &in, &count, &seglen, &total))
        return NULL;
    const uint8_t *b = in.buf;
    if (!batch_fits(count, seglen, total, in.len)) {
        PyBuffer_Release(&in);
        return fail("tcp_flow_run: batch lengths out of range");
    }
    Py_ssize_t full = count - 1, last_len = total - full * seglen;
    if (count < 1 || seglen < 40 || last_len < 40)
        goto done;
    const struct layout *l = b[0] >> 4 == 6 ? &V6 : &V4;
    Py_ssize_t tcp = l->ip_len, shortest = tcp + 20;
    if (seglen < shortest || last_len < shortest || !plain_tcp(b, l))
        goto done;
    Py_ssize_t data_offset = b[tcp + 12] >> 4;
    if (data_offset < 5)
        goto done;
    Py_ssize_t candidate = tcp + data_offset * 4, mss = seglen - candidate;
    if (mss <= 0 || last_len <= candidate)
        goto done;
    uint32_t seq0 = get32(b + tcp + 4);
    for (Py_ssize_t i = 0; i < count; i++) {
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
        run = i + 1;
        if (flags & TCP_PSH)
            break;
    }
    if (run)
        hlen = candidate;
done:
    PyBuffer_Release(&in);
    return Py_BuildValue("nn", hlen, run);
}

/* The header of a merged super-packet: the last segment's flags (PSH), its
 * length, the IPv4 checksum, and for CHECKSUM_PARTIAL the pseudo-header sum
 * that the kernel completes. */
static void finish_merged(uint8_t *packet, uint8_t flags, Py_ssize_t length, const struct layout *l) {
    Py_ssize_t tcp = l->ip_len;
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
static void copy_payloads(const uint8_t *b, Py_ssize_t count, Py_ssize_t seglen, Py_ssize_t total, Py_ssize_t hlen,
                          uint8_t *dest) {
    Py_ssize_t full = count - 1, mss = seglen - hlen;
    for (Py_ssize_t i = 0; i < full; i++, dest += mss)
        memcpy(dest, b + i * seglen + hlen, mss);
    memcpy(dest, b + full * seglen + hlen, total - full * seglen - hlen);
}

/* merge(batch, count, seglen, total, hlen, out) -> the super-packet's length in out */
static PyObject *merge(PyObject *args, const struct layout *l) {
    Py_buffer in, out;
    Py_ssize_t count, seglen, total, hlen;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnw*", &in, &count, &seglen, &total, &hlen, &out))
        return NULL;
    const uint8_t *b = in.buf;
    Py_ssize_t full = count - 1, mss = seglen - hlen, length = total - full * hlen;
    if (!batch_fits(count, seglen, total, in.len) || count < 2 || hlen < l->ip_len + 20 || mss <= 0
        || total - full * seglen <= hlen || length > 0xFFFF || length > out.len) {
        fail(l->merge_error);
        goto done;
    }
    uint8_t *packet = out.buf;
    memcpy(packet, b, hlen);
    copy_payloads(b, count, seglen, total, hlen, packet + hlen);
    finish_merged(packet, b[full * seglen + l->ip_len + 13], length, l);
    result = PyLong_FromSsize_t(length);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *merge_tcp4(PyObject *self, PyObject *args) { return merge(args, &V4); }
static PyObject *merge_tcp6(PyObject *self, PyObject *args) { return merge(args, &V6); }

/* extend(batch, count, seglen, total, hlen, out, used) -> new length, or 0:
 * append a run (checked by tcp_flow_run) to the super-packet that merge
 * or this function left in out[:used], when the run continues it: the same
 * flow header, the next sequence number, whole segments so far, no PSH yet,
 * and room under the IP length limit (as offload_python._extend). */
static PyObject *extend(PyObject *args, const struct layout *l) {
    Py_buffer in, out;
    Py_ssize_t count, seglen, total, hlen, used, grown = 0;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnnnw*n", &in, &count, &seglen, &total, &hlen, &out, &used))
        return NULL;
    const uint8_t *b = in.buf;
    Py_ssize_t full = count - 1, mss = seglen - hlen, tcp = l->ip_len;
    if (!batch_fits(count, seglen, total, in.len) || count < 1 || hlen < tcp + 20 || hlen > tcp + 60 || mss <= 0
        || total - full * seglen <= hlen || used < hlen || used > out.len) {
        fail(l->extend_error);
        goto done;
    }
    uint8_t *packet = out.buf;
    Py_ssize_t merged_payload = used - hlen, grown_length = used + total - count * hlen;
    if (merged_payload % mss || packet[tcp + 13] != TCP_ACK || grown_length > 0xFFFF || grown_length > out.len)
        goto answer;
    if (!same_flow(packet, b, hlen, l) || get32(b + tcp + 4) != get32(packet + tcp + 4) + (uint32_t)merged_payload)
        goto answer;
    copy_payloads(b, count, seglen, total, hlen, packet + used);
    finish_merged(packet, b[full * seglen + tcp + 13], grown_length, l);
    grown = grown_length;
answer:
    result = PyLong_FromSsize_t(grown);
done:
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *extend_tcp4(PyObject *self, PyObject *args) { return extend(args, &V4); }
static PyObject *extend_tcp6(PyObject *self, PyObject *args) { return extend(args, &V6); }

/* plain_ipv4_batch(batch, count, seglen, total, src_net, dst_net, mask) -> bool:
 * every datagram a plain IPv4 header (no options) with the right length and
 * checksum, its source in src_net and its destination in dst_net. */
static PyObject *plain_ipv4_batch(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t count, seglen, total;
    unsigned long src_net, dst_net, mask;
    int ok = 0;
    if (!PyArg_ParseTuple(args, "y*nnnkkk", &in, &count, &seglen, &total, &src_net, &dst_net, &mask))
        return NULL;
    const uint8_t *b = in.buf;
    if (!batch_fits(count, seglen, total, in.len)) {
        PyBuffer_Release(&in);
        return fail("plain_ipv4_batch: batch lengths out of range");
    }
    Py_ssize_t full = count - 1, last_len = total - full * seglen;
    if (count < 1 || seglen < 20 || last_len < 20)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        const uint8_t *h = b + i * seglen;
        if (h[0] != 0x45 || get16(h + 2) != (i < full ? seglen : last_len) || !ip_header_valid(h))
            goto done;
        if ((get32(h + 12) & mask) != src_net || (get32(h + 16) & mask) != dst_net)
            goto done;
    }
    ok = 1;
done:
    PyBuffer_Release(&in);
    return PyBool_FromLong(ok);
}

/* complete_checksum(packet, n, start, offset, udp) -> None: finish a
 * CHECKSUM_PARTIAL packet whose checksum field holds the pseudo-header sum. */
static PyObject *complete_checksum(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t n, start, offset;
    int udp;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "w*nnnp", &buf, &n, &start, &offset, &udp))
        return NULL;
    if (n > buf.len || start < 0 || start > n || offset < 0 || start + offset + 2 > n) {
        fail("complete_checksum: start or offset outside the packet");
        goto done;
    }
    uint8_t *p = buf.buf;
    uint32_t value = checksum(p + start, n - start, 0);
    if (udp && value == 0)
        value = 0xFFFF;
    put16(p + start + offset, value);
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"segment_tcp4", segment_tcp4, METH_VARARGS, "Split a TCP/IPv4 super-packet into MSS-sized packets."},
    {"segment_tcp6", segment_tcp6, METH_VARARGS, "Split a plain TCP/IPv6 super-packet into MSS-sized packets."},
    {"tcp_flow_run", tcp_flow_run, METH_VARARGS, "(header length, count) of the leading datagrams that form one in-order TCP run."},
    {"merge_tcp4", merge_tcp4, METH_VARARGS, "Write a checked run as one TCP super-packet (CHECKSUM_PARTIAL)."},
    {"extend_tcp4", extend_tcp4, METH_VARARGS, "Append a run to the super-packet it continues; the new length or 0."},
    {"merge_tcp6", merge_tcp6, METH_VARARGS, "Write a checked TCP/IPv6 run as one super-packet (CHECKSUM_PARTIAL)."},
    {"extend_tcp6", extend_tcp6, METH_VARARGS, "Append a TCP/IPv6 run to the super-packet it continues; the new length or 0."},
    {"plain_ipv4_batch", plain_ipv4_batch, METH_VARARGS, "True if every datagram is a plain valid IPv4 packet between two subnets."},
    {"complete_checksum", complete_checksum, METH_VARARGS, "Finish a CHECKSUM_PARTIAL packet's TCP or UDP checksum."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_offload", "Compiled offload stages of the udp backend (see offload_python.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__offload(void) { return PyModule_Create(&module); }
