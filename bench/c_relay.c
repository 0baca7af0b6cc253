/* SPDX-License-Identifier: Apache-2.0
 *
 * bench's c-relay mode: the smallest userspace TUN <-> UDP relay between two
 * nodes, one packet per read and per sendto, as flannel's own UDP backend
 * (proxy.c) moves packets, without its route table, TTL handling or checks.
 * It is a reference, not a datapath: what any design that wakes a process
 * for each packet costs on this machine, measured in the same run as the
 * others. Its UDP socket has the daemon's buffer sizes; the TUN device is the
 * daemon's flannel0 (same queue length). Offloads are off on both (as with
 * --offload=false). Usage: c-relay TUN LOCAL_IP PEER_IP (port 8285 both ends).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int open_tun(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (fd < 0 || ioctl(fd, TUNSETIFF, &ifr) < 0) {
        perror("c-relay: attach to TUN device");
        return -1;
    }
    return fd;
}

/* The daemon's socket buffers (udpconn.py: 8 MiB each way, the FORCE variants as root,
 * past net.core.[rw]mem_max), so the reference is never weaker than what it is compared with. */
#define SOCKET_BUFFER (8 * 1024 * 1024)

static void grow_buffers(int fd) {
    int size = SOCKET_BUFFER;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size) < 0)
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
}

static int open_udp(const char *local, struct sockaddr_in *peer, const char *peer_ip) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(8285)};
    *peer = addr;
    if (fd >= 0)
        grow_buffers(fd);
    if (fd < 0 || inet_pton(AF_INET, local, &addr.sin_addr) != 1 || inet_pton(AF_INET, peer_ip, &peer->sin_addr) != 1
        || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("c-relay: UDP socket");
        return -1;
    }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: c-relay TUN LOCAL_IP PEER_IP\n");
        return 2;
    }
    struct sockaddr_in peer;
    int tun = open_tun(argv[1]), sock = open_udp(argv[2], &peer, argv[3]), ep = epoll_create1(0);
    if (tun < 0 || sock < 0 || ep < 0)
        return 1;
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = tun};
    epoll_ctl(ep, EPOLL_CTL_ADD, tun, &ev);
    ev.data.fd = sock;
    epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev);
    static char buf[65536];
    for (;;) {
        struct epoll_event ready[2];
        int n = epoll_wait(ep, ready, 2, -1);
        for (int i = 0; i < n; i++) {
            ssize_t len;
            if (ready[i].data.fd == tun)
                while ((len = read(tun, buf, sizeof buf)) > 0)
                    sendto(sock, buf, (size_t)len, 0, (struct sockaddr *)&peer, sizeof peer);
            else
                while ((len = recv(sock, buf, sizeof buf, 0)) > 0)
                    if (write(tun, buf, (size_t)len) < 0)
                        continue; /* a full TUN queue drops, as the kernel would */
        }
    }
}
