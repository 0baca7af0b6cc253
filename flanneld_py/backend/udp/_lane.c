/* SPDX-License-Identifier: Apache-2.0
 *
 * flanneld_py.backend.udp._lane: the udp backend's fast lane, a C thread that
 * moves lone packets which are plain forwards under the engine's peer table,
 * so that a packet alone in its wakeup does not wake the Python interpreter.
 *
 * The lane decides only "plain forward" (the rule the engine states in
 * Engine.outbound / Engine.inbound, which the differential tests hold this
 * file to), and with the bulk buffers also moves the TCP bulk path as the
 * Python loop does (loop.Pump): a frame whose checksum is to be completed, a
 * TCPv4 super-packet (split with the shared offload stages and sent with
 * UDP_SEGMENT), a GRO read of plain forwards (runs of one TCP flow merged into
 * a super-packet written with a GSO virtio-net header, other plain datagrams
 * written one by one). Everything else is handed to the Python loop unchanged,
 * with the descriptor: an IPv6 packet, an offload the lane does not take, a
 * datagram to drop, answer with ICMP or count as a drop. The handover
 * leaves the frame in the read buffer Python gave the lane (for a GRO read,
 * with the first datagram the lane did not forward), signals an eventfd,
 * and the lane stops reading that descriptor until Python gives it back
 * (resume), so one reader owns each descriptor at any time.
 *
 * Counters: per peer (packets, bytes, last time), the two send/write
 * failures, and per-wakeup batch histograms; Python folds them into its own
 * (take_counts). The peer table is a copy the engine pushes (set_peers).
 * The thread holds the lane's lock while it drains a descriptor; Python
 * takes it only to swap the table or take the counters.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "offload_stages.h"

#define VNET_HDR_LEN 10
#define VNET_NEEDS_CSUM 1
#define VNET_GSO_NONE 0
#define VNET_GSO_TCPV4 1
#define LANE_SOL_UDP 17
#define LANE_UDP_SEGMENT 103
#define LANE_UDP_GRO 104
#define PROTO_UDP 17
#define DRAIN 64 /* reads per wakeup before giving other descriptors a turn */
#define BUCKETS 8

enum { DIR_TUN = 0, DIR_UDP = 1, DIR_STOP = 2 };
#define NOTHING_HANDED (-2) /* no handover waiting */
#define HANDED_UNREAD (-1)  /* handed over with no frame read: Python reads itself */

static inline uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void put_le16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

typedef struct {
    uint32_t subnet; /* network address, host order */
    struct sockaddr_in addr;
    unsigned long long tx_packets, tx_bytes, rx_packets, rx_bytes;
    double last_tx, last_rx;
} LanePeer;

typedef struct {
    LanePeer *peers;
    Py_ssize_t count;
    int32_t *slots; /* open addressing by subnet: peer index + 1, 0 empty */
    uint32_t slot_mask;
} Table;

typedef struct {
    PyObject_HEAD
    int tun_fd, udp_fd, epoll_fd, handover_fd, stop_fd;
    int vnet, gro, started, closed, lock_ready;
    uint32_t mask, own_net;
    Py_buffer tun_buf, udp_buf;
    Py_buffer seg_buf, merge_buf; /* the bulk path's (obj NULL: off): the loop's send run and merge buffers */
    long gso_segments, gso_bytes;  /* UDP_SEGMENT's limits per send (0: no GSO) */
    long segment_room;             /* the largest split the loop itself always takes */
    ssize_t merged, merged_hlen, merged_mss; /* a super-packet waiting in merge_buf for more of its flow */
    pthread_mutex_t lock;
    pthread_t thread;
    Table table;
    atomic_long tun_handed;
    atomic_int udp_handed;
    atomic_int failed; /* the errno that stopped the thread: the loop then keeps both descriptors */
    long udp_nbytes, udp_seglen, udp_start;
    struct sockaddr_in udp_source;
    unsigned long long send_failed, tun_write_failed;
    unsigned long long buckets[2][BUCKETS];
} Lane;

/* --- the peer table ------------------------------------------------------- */

static inline uint32_t slot_of(uint32_t key, uint32_t mask) { return (key * 2654435761u >> 7) & mask; }

static int table_find(const Table *t, uint32_t key) {
    if (!t->count)
        return -1;
    for (uint32_t at = slot_of(key, t->slot_mask);; at = (at + 1) & t->slot_mask) {
        int32_t slot = t->slots[at];
        if (!slot)
            return -1;
        if (t->peers[slot - 1].subnet == key)
            return slot - 1;
    }
}

static void table_free(Table *t) {
    PyMem_RawFree(t->peers);
    PyMem_RawFree(t->slots);
    memset(t, 0, sizeof *t);
}

/* --- the plain-forward rule (Engine.outbound / Engine.inbound, forward case) --- */

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* What the lane makes of a flannel0 frame it forwards: the packet (or, for a
 * super-packet, its segments back to back in seg_buf) and the segment size. */
typedef struct {
    uint8_t *data;
    size_t length, seglen;
} Outgoing;

/* The offload a frame's virtio-net header asks for, when the lane honours it as
 * TunQueue.parse does: 0 with *mss and *csum set, -1 to leave the frame to the loop. */
static int frame_offload(Lane *l, const uint8_t *frame, size_t len, long *mss, ssize_t csum[2]) {
    uint8_t kind = frame[1] & 0x7F;
    *mss = 0;
    csum[0] = -1;
    if (kind == VNET_GSO_TCPV4) {
        *mss = le16(frame + 4);
        return l->seg_buf.obj != NULL && *mss ? 0 : -1; /* no MSS: the loop sends it whole */
    }
    if (kind != VNET_GSO_NONE)
        return -1;
    if (!(frame[0] & VNET_NEEDS_CSUM) || len <= 9)
        return 0;
    ssize_t start = le16(frame + 6), offset = le16(frame + 8);
    /* TunQueue.parse completes the checksum before the engine reads the header: the
     * lane takes only a field past the fixed IPv4 header, which no check reads */
    if (l->seg_buf.obj == NULL || !partial_fits((ssize_t)len, start, offset) || start + offset < 20)
        return -1;
    csum[0] = start;
    csum[1] = offset;
    return 0;
}

/* A frame read from flannel0 (virtio-net header first when vnet): the peer index
 * if its packet is an IPv4 plain forward (a TCPv4 super-packet split into seg_buf;
 * a CHECKSUM_PARTIAL checksum completed), with the TTL decremented in place and
 * the peer's counters taken; -1 (frame untouched) for anything else. */
static int forward_out_frame(Lane *l, uint8_t *frame, size_t n, double now, Outgoing *out) {
    uint8_t *pkt = frame;
    size_t len = n;
    long mss = 0;
    ssize_t csum[2] = {-1, 0};
    if (l->vnet) {
        if (n < VNET_HDR_LEN || frame_offload(l, frame, n - VNET_HDR_LEN, &mss, csum) < 0)
            return -1;
        pkt += VNET_HDR_LEN;
        len -= VNET_HDR_LEN;
    }
    if (len < 20 || pkt[0] >> 4 != 4)
        return -1;
    int index = table_find(&l->table, get32(pkt + 16) & l->mask);
    if (index < 0 || pkt[8] <= 1)
        return -1;
    ssize_t ip_len = 0, hlen = 0;
    struct split split = {0};
    if (mss && (tcp4_headers(pkt, (ssize_t)len, mss, &ip_len, &hlen) != NULL
                || !plan_split((ssize_t)len, mss, hlen, l->segment_room, &split)))
        return -1; /* the loop's to count as a bad offload header */
    if (csum[0] >= 0)
        complete_partial(pkt, (ssize_t)len, csum[0], csum[1], pkt[9] == PROTO_UDP);
    pkt[8]--;
    uint32_t sum = (uint32_t)get16(pkt + 10) + 0x0100; /* as core.packet.decrement_ttl */
    sum = (sum + (sum >= 0xFFFF)) & 0xFFFF;
    pkt[10] = (uint8_t)(sum >> 8);
    pkt[11] = (uint8_t)sum;
    LanePeer *peer = &l->table.peers[index];
    if (mss) {
        split_segments(pkt, mss, ip_len, hlen, 0, &split, l->seg_buf.buf);
        *out = (Outgoing){.data = l->seg_buf.buf, .length = (size_t)split.total, .seglen = (size_t)split.seglen};
        peer->tx_packets += (unsigned long long)split.count;
    } else {
        *out = (Outgoing){.data = pkt, .length = len, .seglen = len};
        peer->tx_packets++;
    }
    peer->tx_bytes += out->length;
    peer->last_tx = now;
    return index;
}

/* A datagram from source (host order): the peer index if it is a plain forward
 * into flannel0 (check_ipv4 passes, source inside the sender's subnet, destination
 * inside ours), with the peer's counters taken; -1 for anything else. */
static int forward_in_packet(Lane *l, const uint8_t *pkt, size_t n, uint32_t source, double now) {
    if (n < 20 || pkt[0] >> 4 != 4)
        return -1;
    size_t hlen = (size_t)(pkt[0] & 0x0F) * 4;
    if (hlen < 20 || hlen > n || get16(pkt + 2) != n)
        return -1;
    if (sum_le(pkt, hlen, 0) % 0xFFFF) /* the header checksum, as ip_header_valid with options */
        return -1;
    int index = table_find(&l->table, get32(pkt + 12) & l->mask);
    if (index < 0 || ntohl(l->table.peers[index].addr.sin_addr.s_addr) != source
        || (get32(pkt + 16) & l->mask) != l->own_net)
        return -1;
    LanePeer *peer = &l->table.peers[index];
    peer->rx_packets++;
    peer->rx_bytes += n;
    peer->last_rx = now;
    return index;
}

/* The sending peer of an IPv4 header whose datagrams may all enter flannel0 if it
 * may (Engine.inbound_flow for a checked flow run, Engine.inbound_batch's peer), or -1. */
static int source_peer(Lane *l, const uint8_t *h, uint32_t source) {
    if (h[0] >> 4 != 4)
        return -1;
    int index = table_find(&l->table, get32(h + 12) & l->mask);
    if (index < 0 || ntohl(l->table.peers[index].addr.sin_addr.s_addr) != source)
        return -1;
    return index;
}

static void count_rx(Lane *l, int index, ssize_t packets, ssize_t bytes, double now) {
    LanePeer *peer = &l->table.peers[index];
    peer->rx_packets += (unsigned long long)packets;
    peer->rx_bytes += (unsigned long long)bytes;
    peer->last_rx = now;
}

/* --- the bulk path's writes and sends (TunQueue.write, write_super; KernelUdp.send) --- */

static void write_packet(Lane *l, const uint8_t *pkt, size_t n) {
    static const uint8_t zero_vnet[VNET_HDR_LEN];
    ssize_t wrote;
    if (l->vnet) {
        struct iovec parts[2] = {{.iov_base = (void *)zero_vnet, .iov_len = VNET_HDR_LEN},
                                 {.iov_base = (void *)pkt, .iov_len = n}};
        wrote = writev(l->tun_fd, parts, 2);
    } else {
        wrote = write(l->tun_fd, pkt, n);
    }
    if (wrote < 0)
        l->tun_write_failed++;
}

/* Write the waiting super-packet with its GSO virtio-net header (as TunQueue.write_super). */
static void flush_merged(Lane *l) {
    if (!l->merged)
        return;
    uint8_t *frame = l->merge_buf.buf;
    frame[0] = VNET_NEEDS_CSUM;
    frame[1] = VNET_GSO_TCPV4;
    put_le16(frame + 2, (uint32_t)l->merged_hlen);
    put_le16(frame + 4, (uint32_t)l->merged_mss);
    put_le16(frame + 6, 20);
    put_le16(frame + 8, 16);
    if (write(l->tun_fd, frame, VNET_HDR_LEN + (size_t)l->merged) < 0)
        l->tun_write_failed++;
    l->merged = 0;
}

/* A checked run of one flow: extend the waiting super-packet with it, or write that one
 * and start anew (as Pump._merge_run; the lane's super-packets are IPv4 only). */
static void merge_in(Lane *l, const uint8_t *run_start, ssize_t run, ssize_t seglen, ssize_t run_bytes, ssize_t hlen) {
    uint8_t *out = (uint8_t *)l->merge_buf.buf + VNET_HDR_LEN;
    ssize_t room = l->merge_buf.len - VNET_HDR_LEN;
    if (l->merged) {
        if (extend_fits(run, seglen, run_bytes, hlen, l->merged, room, &V4)) {
            ssize_t grown = extend_run(run_start, run, seglen, run_bytes, hlen, out, room, l->merged, &V4);
            if (grown) {
                l->merged = grown;
                return;
            }
        }
        flush_merged(l);
    }
    if (run >= 2)
        l->merged = merge_run(run_start, run, seglen, run_bytes, hlen, out, room, &V4);
    if (l->merged) {
        l->merged_hlen = hlen;
        l->merged_mss = seglen - hlen;
        return;
    }
    for (ssize_t at = 0; at < run_bytes; at += seglen) /* one segment (or, never met, lengths merge refuses) */
        write_packet(l, run_start + at, (size_t)(run_bytes - at < seglen ? run_bytes - at : seglen));
}

static int send_failed_as_gso_refused(int err) { return err == EIO || err == EINVAL || err == ENOPROTOOPT; }

/* How many datagrams of seglen one send carries (as KernelUdp.per_send). */
static size_t per_send(const Lane *l, size_t seglen) {
    if (!l->gso_segments)
        return 1;
    size_t per = (size_t)l->gso_bytes / seglen;
    return per > (size_t)l->gso_segments ? (size_t)l->gso_segments : per;
}

/* Send datagrams of seglen bytes back to back (the last may be shorter) to addr, as
 * many per sendmsg as UDP_SEGMENT carries; a device that refuses GSO gets one datagram
 * per call from then on (as KernelUdp.send). Unsent datagrams count as send failures. */
static void send_datagrams(Lane *l, const uint8_t *data, size_t length, size_t seglen, const struct sockaddr_in *addr) {
    size_t chunk = per_send(l, seglen) * seglen;
    for (size_t at = 0; at < length; at += chunk) {
        size_t size = length - at < chunk ? length - at : chunk;
        if (size <= seglen) {
            if (sendto(l->udp_fd, data + at, size, 0, (const struct sockaddr *)addr, sizeof *addr) < 0)
                l->send_failed++;
            continue;
        }
        union {
            char buf[CMSG_SPACE(sizeof(uint16_t))];
            struct cmsghdr align;
        } control;
        memset(&control, 0, sizeof control);
        struct iovec iov = {.iov_base = (void *)(data + at), .iov_len = size};
        struct msghdr msg = {.msg_name = (void *)addr, .msg_namelen = sizeof *addr, .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = control.buf, .msg_controllen = sizeof control.buf};
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = LANE_SOL_UDP;
        c->cmsg_type = LANE_UDP_SEGMENT;
        c->cmsg_len = CMSG_LEN(sizeof(uint16_t));
        uint16_t segment = (uint16_t)seglen;
        memcpy(CMSG_DATA(c), &segment, sizeof segment);
        if (sendmsg(l->udp_fd, &msg, 0) >= 0)
            continue;
        if (send_failed_as_gso_refused(errno)) {
            l->gso_segments = 0;
            send_datagrams(l, data + at, size, seglen, addr);
        } else {
            l->send_failed += (size + seglen - 1) / seglen;
        }
    }
}

/* --- the bulk path's reads (Pump._on_udp, _ingress_batch) ---------------------- */

/* Take what the loop would forward of a read of n bytes in datagrams of seglen from
 * source, in the loop's order: the index of the first datagram left to the loop
 * (with any waiting super-packet written first), or the datagram count when the
 * lane took it all. *taken: how many datagrams it forwarded. */
static ssize_t take_read(Lane *l, const uint8_t *buf, ssize_t cap, ssize_t n, ssize_t seglen, uint32_t source,
                         double now, ssize_t *taken) {
    *taken = 0;
    if (seglen >= n && !l->merged) { /* one datagram: Pump._ingress_one */
        int index = forward_in_packet(l, buf, (size_t)n, source, now);
        if (index < 0)
            return 0;
        write_packet(l, buf, (size_t)n);
        *taken = 1;
        return 1;
    }
    if (l->merge_buf.obj == NULL || !l->vnet || n <= 0 || seglen <= 0)
        goto leave_from_first;
    ssize_t segments = (n + seglen - 1) / seglen, index = 0;
    if (!batch_fits(segments, seglen, n, cap))
        goto leave_from_first;
    while (index < segments) {
        ssize_t offset = index * seglen, hlen, run;
        const uint8_t *rest = buf + offset;
        flow_run(rest, segments - index, seglen, n - offset, &hlen, &run);
        if (run >= 2 || (run && l->merged)) {
            ssize_t run_bytes = run * seglen < n - offset ? run * seglen : n - offset;
            int peer = source_peer(l, rest, source);
            if (peer >= 0 && (get32(rest + 16) & l->mask) == l->own_net) {
                count_rx(l, peer, run, run_bytes, now);
                merge_in(l, rest, run, seglen, run_bytes, hlen);
                index += run;
                *taken += run;
                continue;
            }
            if (run >= 2) /* the loop checks these one by one, and the first already fails */
                break;
        }
        if (!run && !index) {
            int peer = seglen >= 20 && n - (segments - 1) * seglen >= 20 ? source_peer(l, buf, source) : -1;
            if (peer >= 0 && plain_ipv4(buf, segments, seglen, n, l->table.peers[peer].subnet, l->own_net, l->mask)) {
                flush_merged(l);
                count_rx(l, peer, segments, n, now);
                for (ssize_t at = 0; at < n; at += seglen)
                    write_packet(l, buf + at, (size_t)(n - at < seglen ? n - at : seglen));
                *taken = segments;
                return segments;
            }
        }
        flush_merged(l); /* Pump._ingress_one writes a waiting super-packet first */
        ssize_t size = n - offset < seglen ? n - offset : seglen;
        if (forward_in_packet(l, rest, (size_t)size, source, now) < 0)
            break;
        write_packet(l, rest, (size_t)size);
        index++;
        (*taken)++;
    }
    if (index < segments)
        flush_merged(l);
    return index;
leave_from_first:
    flush_merged(l);
    return 0;
}

/* --- the thread ----------------------------------------------------------- */

/* The thread polls a descriptor (level-triggered) from resume until its handover, when it
 * drops it from its epoll set altogether, so not even an error wakes it for a descriptor
 * that the Python loop reads. Nothing is re-armed per wakeup. */
static int watch(Lane *l, int dir) {
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)dir};
    return epoll_ctl(l->epoll_fd, EPOLL_CTL_ADD, dir == DIR_TUN ? l->tun_fd : l->udp_fd, &ev);
}

static void hand_over(Lane *l, int dir) {
    epoll_ctl(l->epoll_fd, EPOLL_CTL_DEL, dir == DIR_TUN ? l->tun_fd : l->udp_fd, NULL);
    uint64_t one = 1;
    while (write(l->handover_fd, &one, sizeof one) < 0 && errno == EINTR) {
    }
}

static void record(Lane *l, int dir, long count) {
    int bucket = 0;
    while (count >> bucket && bucket < BUCKETS - 1)
        bucket++;
    l->buckets[dir][bucket]++;
}

/* Packets of one size to one peer, gathered for GSO sends as Pump._queue_small does (a UDP
 * flood, a run of ACKs), in the send buffer past the room that splits use. */
typedef struct {
    uint8_t *at;
    size_t room, used, seglen;
    int peer;
} SmallRun;

static void send_small(Lane *l, SmallRun *run) {
    if (run->used)
        send_datagrams(l, run->at, run->used, run->seglen, &l->table.peers[run->peer].addr);
    run->used = 0;
}

/* Send one forwarded frame's datagrams, or gather a packet into the run. */
static void send_out(Lane *l, SmallRun *run, const Outgoing *out, int peer) {
    size_t per = out->length == out->seglen && run->at != NULL ? per_send(l, out->length) : 1;
    if (run->used && (per == 1 || peer != run->peer || out->length != run->seglen))
        send_small(l, run);
    if (per == 1 || per * out->length > run->room) {
        send_datagrams(l, out->data, out->length, out->seglen, &l->table.peers[peer].addr);
        return;
    }
    memcpy(run->at + run->used, out->data, out->length);
    run->used += out->length;
    run->seglen = out->length;
    run->peer = peer;
    if (run->used == per * out->length)
        send_small(l, run);
}

static void drain_tun(Lane *l) {
    uint8_t *buf = l->tun_buf.buf;
    size_t cap = (size_t)l->tun_buf.len;
    double now = monotonic();
    int count = 0;
    SmallRun run = {0};
    if (l->seg_buf.obj != NULL && l->gso_segments) {
        run.at = (uint8_t *)l->seg_buf.buf + l->segment_room;
        run.room = (size_t)(l->seg_buf.len - l->segment_room);
    }
    for (;;) {
        if (count == DRAIN) /* level-triggered: the next epoll_wait comes back at once */
            break;
        ssize_t n = read(l->tun_fd, buf, cap);
        if (n <= 0) {
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { /* Python's own read meets it and reports it */
                send_small(l, &run);
                atomic_store(&l->tun_handed, HANDED_UNREAD);
                hand_over(l, DIR_TUN);
            }
            break;
        }
        Outgoing out;
        int index = forward_out_frame(l, buf, (size_t)n, now, &out);
        if (index < 0) {
            send_small(l, &run); /* before the loop sends what comes after */
            atomic_store(&l->tun_handed, (long)n);
            hand_over(l, DIR_TUN);
            break;
        }
        count++;
        send_out(l, &run, &out, index);
    }
    send_small(l, &run); /* within the same wakeup: gathering adds no delay */
    if (count)
        record(l, DIR_TUN, count);
}

static void drain_udp(Lane *l) {
    uint8_t *buf = l->udp_buf.buf;
    double now = monotonic();
    long count = 0;
    int reads = 0;
    for (;;) {
        if (reads++ == DRAIN)
            break;
        struct sockaddr_in source;
        union {
            char buf[CMSG_SPACE(sizeof(int))];
            struct cmsghdr align;
        } control;
        struct iovec iov = {.iov_base = buf, .iov_len = (size_t)l->udp_buf.len};
        struct msghdr msg = {.msg_name = &source, .msg_namelen = sizeof source, .msg_iov = &iov, .msg_iovlen = 1,
                             .msg_control = l->gro ? control.buf : NULL, .msg_controllen = l->gro ? sizeof control.buf : 0};
        ssize_t n = recvmsg(l->udp_fd, &msg, 0);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            continue; /* as KernelUdp.recv: e.g. a queued ICMP error for an earlier send */
        }
        long seglen = (long)n;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
            if (c->cmsg_level == LANE_SOL_UDP && c->cmsg_type == LANE_UDP_GRO && c->cmsg_len >= CMSG_LEN(sizeof(int))) {
                int gro;
                memcpy(&gro, CMSG_DATA(c), sizeof gro);
                if (gro)
                    seglen = gro;
            }
        }
        ssize_t taken = 0, start = 0, segments = seglen >= n || seglen <= 0 ? 1 : (n + seglen - 1) / seglen;
        if (source.sin_family == AF_INET)
            start = take_read(l, buf, l->udp_buf.len, n, seglen, ntohl(source.sin_addr.s_addr), now, &taken);
        else
            flush_merged(l);
        count += taken;
        if (start < segments) {
            l->udp_nbytes = (long)n;
            l->udp_seglen = seglen;
            l->udp_start = (long)start;
            l->udp_source = source;
            atomic_store(&l->udp_handed, 1);
            hand_over(l, DIR_UDP);
            break;
        }
    }
    flush_merged(l); /* within the same wakeup: merging adds no delay */
    if (count)
        record(l, DIR_UDP, count);
}

static void *run(void *arg) {
    Lane *l = arg;
    for (;;) {
        struct epoll_event ready[3];
        int n = epoll_wait(l->epoll_fd, ready, 3, -1);
        if (n < 0 && errno != EINTR) { /* never leave a descriptor unread: the loop takes both */
            atomic_store(&l->failed, errno);
            uint64_t one = 1;
            while (write(l->handover_fd, &one, sizeof one) < 0 && errno == EINTR) {
            }
            return NULL;
        }
        for (int i = 0; i < n; i++) {
            uint32_t dir = ready[i].data.u32;
            if (dir == DIR_STOP)
                return NULL;
            pthread_mutex_lock(&l->lock);
            if (dir == DIR_TUN)
                drain_tun(l);
            else
                drain_udp(l);
            pthread_mutex_unlock(&l->lock);
        }
    }
}

/* --- Python interface ----------------------------------------------------- */

static void lane_release(Lane *l) {
    if (l->started) {
        uint64_t one = 1;
        if (write(l->stop_fd, &one, sizeof one) < 0) {
        }
        Py_BEGIN_ALLOW_THREADS
        pthread_join(l->thread, NULL);
        Py_END_ALLOW_THREADS
        l->started = 0;
    }
    if (!l->closed) {
        l->closed = 1;
        int *own[] = {&l->epoll_fd, &l->handover_fd, &l->stop_fd};
        for (size_t i = 0; i < sizeof own / sizeof own[0]; i++)
            if (*own[i] >= 0) {
                close(*own[i]);
                *own[i] = -1;
            }
        Py_buffer *own_buffers[] = {&l->tun_buf, &l->udp_buf, &l->seg_buf, &l->merge_buf};
        for (size_t i = 0; i < sizeof own_buffers / sizeof own_buffers[0]; i++)
            if (own_buffers[i]->obj)
                PyBuffer_Release(own_buffers[i]);
    }
}

static void Lane_dealloc(Lane *l) {
    lane_release(l);
    if (l->lock_ready) /* the table and counters outlive close(), for a last take_counts() */
        pthread_mutex_destroy(&l->lock);
    table_free(&l->table);
    Py_TYPE(l)->tp_free((PyObject *)l);
}

static PyObject *Lane_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    (void)args;
    (void)kwargs;
    Lane *l = (Lane *)type->tp_alloc(type, 0);
    if (l != NULL) {
        l->tun_fd = l->udp_fd = l->epoll_fd = l->handover_fd = l->stop_fd = -1;
        l->closed = 1; /* nothing to release until __init__ has run */
    }
    return (PyObject *)l;
}

static int Lane_init(Lane *l, PyObject *args, PyObject *kwargs) {
    static char *keywords[] = {"tun_fd", "udp_fd", "tun_buffer", "udp_buffer", "vnet", "gro", "mask", "own_net",
                               "send_buffer", "merge_buffer", "gso_segments", "gso_bytes", "segment_room", NULL};
    unsigned long mask, own_net;
    if (!l->closed) {
        PyErr_SetString(PyExc_RuntimeError, "a lane is set up once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iiw*w*ppkk|w*w*lll", keywords, &l->tun_fd, &l->udp_fd,
                                     &l->tun_buf, &l->udp_buf, &l->vnet, &l->gro, &mask, &own_net, &l->seg_buf,
                                     &l->merge_buf, &l->gso_segments, &l->gso_bytes, &l->segment_room))
        return -1;
    l->closed = 0;
    int bulk = l->seg_buf.obj != NULL || l->merge_buf.obj != NULL;
    if (bulk && (l->seg_buf.obj == NULL || l->merge_buf.obj == NULL || !l->vnet || l->segment_room < 1
                 || l->segment_room > l->seg_buf.len || l->merge_buf.len <= VNET_HDR_LEN + 60 || l->gso_segments < 0
                 || (l->gso_segments && l->gso_bytes < 1))) {
        PyErr_SetString(PyExc_ValueError, "the bulk path takes a send buffer of segment_room bytes or more, a merge "
                                          "buffer, GSO limits (0: none) and a virtio-net header (vnet)");
        lane_release(l);
        return -1;
    }
    l->lock_ready = 1;
    l->mask = (uint32_t)mask;
    l->own_net = (uint32_t)own_net;
    pthread_mutex_init(&l->lock, NULL);
    atomic_store(&l->tun_handed, NOTHING_HANDED);
    atomic_store(&l->udp_handed, 0);
    l->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    l->handover_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    l->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (l->epoll_fd < 0 || l->handover_fd < 0 || l->stop_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        lane_release(l);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = DIR_STOP};
    int failed = watch(l, DIR_TUN) || watch(l, DIR_UDP) || epoll_ctl(l->epoll_fd, EPOLL_CTL_ADD, l->stop_fd, &ev);
    if (failed) {
        PyErr_SetFromErrno(PyExc_OSError);
        lane_release(l);
        return -1;
    }
    return 0;
}

static int lane_usable(Lane *l) {
    if (l->closed) {
        PyErr_SetString(PyExc_ValueError, "the lane is closed");
        return 0;
    }
    return 1;
}

static PyObject *Lane_start(Lane *l, PyObject *unused) {
    (void)unused;
    if (!lane_usable(l))
        return NULL;
    if (!l->started) {
        int err = pthread_create(&l->thread, NULL, run, l);
        if (err) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        l->started = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *Lane_close(Lane *l, PyObject *unused) {
    (void)unused;
    lane_release(l);
    Py_RETURN_NONE;
}

static PyObject *Lane_fileno(Lane *l, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(l->handover_fd);
}

/* The old table's counters, as take_counts' first item; the lock is held. */
static PyObject *peer_counts(Table *t) {
    PyObject *rows = PyList_New(0);
    for (Py_ssize_t i = 0; rows != NULL && i < t->count; i++) {
        LanePeer *p = &t->peers[i];
        if (!p->tx_packets && !p->rx_packets)
            continue;
        PyObject *row = Py_BuildValue("(nKKKKdd)", i, p->tx_packets, p->tx_bytes, p->rx_packets, p->rx_bytes,
                                      p->last_tx, p->last_rx);
        if (row == NULL || PyList_Append(rows, row) < 0)
            Py_CLEAR(rows);
        Py_XDECREF(row);
        p->tx_packets = p->tx_bytes = p->rx_packets = p->rx_bytes = 0;
    }
    return rows;
}

static void lock(Lane *l) {
    if (pthread_mutex_trylock(&l->lock) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&l->lock);
        Py_END_ALLOW_THREADS
    }
}

static PyObject *Lane_set_peers(Lane *l, PyObject *arg) {
    if (!lane_usable(l))
        return NULL;
    PyObject *seq = PySequence_Fast(arg, "set_peers takes a sequence of (subnet, ip, port)");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    uint32_t slots = 8;
    while (slots < (uint32_t)count * 2)
        slots <<= 1;
    Table t = {.peers = PyMem_RawCalloc(count ? (size_t)count : 1, sizeof(LanePeer)),
               .slots = PyMem_RawCalloc(slots, sizeof(int32_t)), .slot_mask = slots - 1};
    if (t.peers == NULL || t.slots == NULL) {
        table_free(&t);
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        unsigned long subnet;
        const char *ip;
        int port;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ksi", &subnet, &ip, &port))
            goto fail;
        LanePeer *p = &t.peers[t.count];
        p->subnet = (uint32_t)subnet;
        p->addr.sin_family = AF_INET;
        p->addr.sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, ip, &p->addr.sin_addr) != 1) {
            PyErr_Format(PyExc_ValueError, "not an IPv4 address: %s", ip);
            goto fail;
        }
        if (table_find(&t, p->subnet) >= 0) {
            PyErr_SetString(PyExc_ValueError, "a subnet given twice");
            goto fail;
        }
        uint32_t at = slot_of(p->subnet, t.slot_mask);
        while (t.slots[at])
            at = (at + 1) & t.slot_mask;
        t.slots[at] = (int32_t)++t.count;
    }
    Py_DECREF(seq);
    lock(l);
    PyObject *old = peer_counts(&l->table);
    Table retired = l->table;
    l->table = t;
    pthread_mutex_unlock(&l->lock);
    table_free(&retired);
    return old;
fail:
    table_free(&t);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *buckets_tuple(unsigned long long *b) {
    PyObject *out = PyTuple_New(BUCKETS);
    for (int i = 0; out != NULL && i < BUCKETS; i++) {
        PyObject *v = PyLong_FromUnsignedLongLong(b[i]);
        if (v == NULL)
            Py_CLEAR(out);
        else
            PyTuple_SET_ITEM(out, i, v);
        b[i] = 0;
    }
    return out;
}

static PyObject *Lane_take_counts(Lane *l, PyObject *unused) {
    (void)unused;
    if (!l->lock_ready) {
        PyErr_SetString(PyExc_ValueError, "the lane was never set up");
        return NULL;
    }
    lock(l);
    PyObject *rows = peer_counts(&l->table);
    unsigned long long sent = l->send_failed, wrote = l->tun_write_failed;
    l->send_failed = l->tun_write_failed = 0;
    PyObject *tun = buckets_tuple(l->buckets[DIR_TUN]), *udp = buckets_tuple(l->buckets[DIR_UDP]);
    pthread_mutex_unlock(&l->lock);
    if (rows == NULL || tun == NULL || udp == NULL) {
        Py_XDECREF(rows);
        Py_XDECREF(tun);
        Py_XDECREF(udp);
        return NULL;
    }
    return Py_BuildValue("(NKKNN)", rows, sent, wrote, tun, udp);
}

static PyObject *Lane_take(Lane *l, PyObject *unused) {
    (void)unused;
    if (!lane_usable(l))
        return NULL;
    uint64_t value;
    if (read(l->handover_fd, &value, sizeof value) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    long tun = atomic_exchange(&l->tun_handed, NOTHING_HANDED);
    PyObject *tun_item = tun == NOTHING_HANDED ? Py_NewRef(Py_None) : PyLong_FromLong(tun);
    PyObject *udp_item;
    if (atomic_exchange(&l->udp_handed, 0)) {
        char text[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &l->udp_source.sin_addr, text, sizeof text);
        udp_item = Py_BuildValue("(llsl)", l->udp_nbytes, l->udp_seglen, text, l->udp_start);
    } else {
        udp_item = Py_NewRef(Py_None);
    }
    if (tun_item == NULL || udp_item == NULL) {
        Py_XDECREF(tun_item);
        Py_XDECREF(udp_item);
        return NULL;
    }
    return Py_BuildValue("(NN)", tun_item, udp_item);
}

static PyObject *Lane_failure(Lane *l, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(atomic_load(&l->failed));
}

static PyObject *Lane_resume(Lane *l, PyObject *arg) {
    if (!lane_usable(l))
        return NULL;
    long dir = PyLong_AsLong(arg);
    if (dir != DIR_TUN && dir != DIR_UDP) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "resume takes 0 (flannel0) or 1 (the UDP socket)");
        return NULL;
    }
    if (watch(l, (int)dir) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

/* The thread's rules on a given buffer, for the differential tests. */
static PyObject *Lane_forward_out(Lane *l, PyObject *args) {
    Py_buffer frame;
    Py_ssize_t n;
    if (!lane_usable(l) || !PyArg_ParseTuple(args, "w*n", &frame, &n))
        return NULL;
    if (n < 0 || n > frame.len) {
        PyBuffer_Release(&frame);
        PyErr_SetString(PyExc_ValueError, "length outside the buffer");
        return NULL;
    }
    Outgoing out = {0};
    lock(l);
    int index = forward_out_frame(l, frame.buf, (size_t)n, monotonic(), &out);
    pthread_mutex_unlock(&l->lock);
    PyBuffer_Release(&frame);
    return Py_BuildValue("(inn)", index, (Py_ssize_t)out.length, (Py_ssize_t)out.seglen);
}

/* The arguments of what arrived from the underlay, checked: ``n`` bytes inside ``buf``, sent by
 * the dotted IPv4 ``source`` (host order into ``source_ip``). On a bad one ``buf`` is released and
 * ValueError set. */
static int received_args(Py_buffer *buf, Py_ssize_t n, const char *source, uint32_t *source_ip) {
    struct in_addr addr;
    if (n < 0 || n > buf->len || inet_pton(AF_INET, source, &addr) != 1) {
        PyBuffer_Release(buf);
        PyErr_SetString(PyExc_ValueError, "length outside the buffer, or not an IPv4 source");
        return 0;
    }
    *source_ip = ntohl(addr.s_addr);
    return 1;
}

/* The thread's rules on one read (given, not received), writes to flannel0 included. */
static PyObject *Lane_forward_read(Lane *l, PyObject *args) {
    Py_buffer data;
    Py_ssize_t n, seglen, taken;
    const char *source;
    uint32_t source_ip;
    if (!lane_usable(l) || !PyArg_ParseTuple(args, "y*nns", &data, &n, &seglen, &source))
        return NULL;
    if (!received_args(&data, n, source, &source_ip))
        return NULL;
    lock(l);
    Py_ssize_t start = take_read(l, data.buf, data.len, n, seglen, source_ip, monotonic(), &taken);
    pthread_mutex_unlock(&l->lock);
    PyBuffer_Release(&data);
    return Py_BuildValue("(nn)", start, taken);
}

/* The end of the thread's wakeup: a waiting super-packet is written. */
static PyObject *Lane_flush(Lane *l, PyObject *unused) {
    (void)unused;
    if (!lane_usable(l))
        return NULL;
    lock(l);
    flush_merged(l);
    pthread_mutex_unlock(&l->lock);
    Py_RETURN_NONE;
}

static PyObject *Lane_forward_in(Lane *l, PyObject *args) {
    Py_buffer packet;
    Py_ssize_t n;
    const char *source;
    uint32_t source_ip;
    if (!lane_usable(l) || !PyArg_ParseTuple(args, "y*ns", &packet, &n, &source))
        return NULL;
    if (!received_args(&packet, n, source, &source_ip))
        return NULL;
    lock(l);
    int index = forward_in_packet(l, packet.buf, (size_t)n, source_ip, monotonic());
    pthread_mutex_unlock(&l->lock);
    PyBuffer_Release(&packet);
    return PyLong_FromLong(index);
}

static PyMethodDef lane_methods[] = {
    {"start", (PyCFunction)Lane_start, METH_NOARGS, "Start the thread (it owns both descriptors)."},
    {"close", (PyCFunction)Lane_close, METH_NOARGS, "Stop and join the thread, close the lane's own descriptors."},
    {"fileno", (PyCFunction)Lane_fileno, METH_NOARGS, "The eventfd that is readable when a handover waits."},
    {"set_peers", (PyCFunction)Lane_set_peers, METH_O, "Replace the table with [(subnet, ip, port)]; the old table's counts."},
    {"take_counts", (PyCFunction)Lane_take_counts, METH_NOARGS,
     "(peer rows, datagram send failures, TUN write failures, flannel0 batch buckets, UDP batch buckets) since the last call."},
    {"take", (PyCFunction)Lane_take, METH_NOARGS, "(flannel0 handover or None, UDP handover or None)."},
    {"failure", (PyCFunction)Lane_failure, METH_NOARGS, "0 while the thread runs, else the errno that stopped it."},
    {"resume", (PyCFunction)Lane_resume, METH_O, "Give a descriptor back to the thread (0 flannel0, 1 UDP)."},
    {"forward_out", (PyCFunction)Lane_forward_out, METH_VARARGS,
     "The thread's flannel0 rule: (peer index or -1, bytes to send, datagram size)."},
    {"forward_read", (PyCFunction)Lane_forward_read, METH_VARARGS,
     "The thread's rules on a read (data, size, segment size, source): (first datagram left, datagrams taken)."},
    {"flush", (PyCFunction)Lane_flush, METH_NOARGS, "Write the super-packet the thread is merging, if any."},
    {"forward_in", (PyCFunction)Lane_forward_in, METH_VARARGS, "The thread's UDP rule: peer index or -1."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject LaneType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "flanneld_py.backend.udp._lane.Lane",
    .tp_basicsize = sizeof(Lane),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A C thread forwarding plain lone packets between flannel0 and the UDP socket.",
    .tp_new = Lane_new,
    .tp_init = (initproc)Lane_init,
    .tp_dealloc = (destructor)Lane_dealloc,
    .tp_methods = lane_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lane", "The udp backend's fast lane (see lane.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__lane(void) {
    if (PyType_Ready(&LaneType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Lane", (PyObject *)&LaneType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
