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

#include "offload_stages.h"

static PyObject *fail(const char *what) {
    PyErr_SetString(PyExc_ValueError, what);
    return NULL;
}

/* Split packet[:n] (TCP at ip_len, headers of hlen bytes) into mss-sized
 * segments back to back in out: (total, segment_len, count), or NULL with
 * ValueError set. */
static PyObject *segment(const uint8_t *p, Py_ssize_t n, Py_ssize_t mss, Py_buffer *out, Py_ssize_t ip_len,
                         Py_ssize_t hlen, int six) {
    struct split s;
    if (!plan_split(n, mss, hlen, out->len, &s))
        return fail(six ? "segment_tcp6: output buffer too small" : "segment_tcp4: output buffer too small");
    split_segments(p, mss, ip_len, hlen, six, &s, out->buf);
    return Py_BuildValue("nnn", s.total, s.seglen, s.count);
}

/* segment_tcp4(packet, n, mss, out) -> (total, segment_len, count) */
static PyObject *segment_tcp4(PyObject *self, PyObject *args) {
    Py_buffer in, out;
    Py_ssize_t n, mss, ip_len, hlen;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*nnw*", &in, &n, &mss, &out))
        return NULL;
    const char *error = n > in.len ? "segment_tcp4: packet or MSS out of range"
                                   : tcp4_headers(in.buf, n, mss, &ip_len, &hlen);
    if (error != NULL)
        fail(error);
    else
        result = segment(in.buf, n, mss, &out, ip_len, hlen, 0);
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

/* tcp_flow_run(batch, count, seglen, total) -> (header length, run) or (0, 0):
 * how many leading datagrams are in-order segments of one plain TCP flow,
 * IPv4 or IPv6 (as offload_python.tcp_flow_run; a PSH ends the run). */
static PyObject *tcp_flow_run(PyObject *self, PyObject *args) {
    Py_buffer in;
    Py_ssize_t count, seglen, total, hlen, run;
    if (!PyArg_ParseTuple(args, "y*nnn", &in, &count, &seglen, &total))
        return NULL;
    if (!batch_fits(count, seglen, total, in.len)) {
        PyBuffer_Release(&in);
        return fail("tcp_flow_run: batch lengths out of range");
    }
    flow_run(in.buf, count, seglen, total, &hlen, &run);
    PyBuffer_Release(&in);
    return Py_BuildValue("nn", hlen, run);
}

/* merge(batch, count, seglen, total, hlen, out) -> the super-packet's length in out */
static PyObject *merge(PyObject *args, const struct layout *l) {
    Py_buffer in, out;
    Py_ssize_t count, seglen, total, hlen, length = 0;
    if (!PyArg_ParseTuple(args, "y*nnnnw*", &in, &count, &seglen, &total, &hlen, &out))
        return NULL;
    if (batch_fits(count, seglen, total, in.len))
        length = merge_run(in.buf, count, seglen, total, hlen, out.buf, out.len, l);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return length ? PyLong_FromSsize_t(length) : fail(l->merge_error);
}

static PyObject *merge_tcp4(PyObject *self, PyObject *args) { return merge(args, &V4); }
static PyObject *merge_tcp6(PyObject *self, PyObject *args) { return merge(args, &V6); }

/* extend(batch, count, seglen, total, hlen, out, used) -> new length, or 0:
 * append a run (checked by tcp_flow_run) to the super-packet that merge
 * or this function left in out[:used], when the run continues it. */
static PyObject *extend(PyObject *args, const struct layout *l) {
    Py_buffer in, out;
    Py_ssize_t count, seglen, total, hlen, used, grown = -1;
    if (!PyArg_ParseTuple(args, "y*nnnnw*n", &in, &count, &seglen, &total, &hlen, &out, &used))
        return NULL;
    if (batch_fits(count, seglen, total, in.len) && extend_fits(count, seglen, total, hlen, used, out.len, l))
        grown = extend_run(in.buf, count, seglen, total, hlen, out.buf, out.len, used, l);
    PyBuffer_Release(&in);
    PyBuffer_Release(&out);
    return grown >= 0 ? PyLong_FromSsize_t(grown) : fail(l->extend_error);
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
    if (!PyArg_ParseTuple(args, "y*nnnkkk", &in, &count, &seglen, &total, &src_net, &dst_net, &mask))
        return NULL;
    if (!batch_fits(count, seglen, total, in.len)) {
        PyBuffer_Release(&in);
        return fail("plain_ipv4_batch: batch lengths out of range");
    }
    int ok = plain_ipv4(in.buf, count, seglen, total, (uint32_t)src_net, (uint32_t)dst_net, (uint32_t)mask);
    PyBuffer_Release(&in);
    return PyBool_FromLong(ok);
}

/* complete_checksum(packet, n, start, offset, udp) -> None: finish a
 * CHECKSUM_PARTIAL packet whose checksum field holds the pseudo-header sum. */
static PyObject *complete_checksum(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t n, start, offset;
    int udp;
    if (!PyArg_ParseTuple(args, "w*nnnp", &buf, &n, &start, &offset, &udp))
        return NULL;
    int fits = n <= buf.len && partial_fits(n, start, offset);
    if (fits)
        complete_partial(buf.buf, n, start, offset, udp);
    PyBuffer_Release(&buf);
    return fits ? Py_NewRef(Py_None) : fail("complete_checksum: start or offset outside the packet");
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
