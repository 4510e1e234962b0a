/*
 * Load generator and targets for the streamrelay benchmark (loopback only).
 *
 * Compiled at run time by tests/benchmarks/tools.py.  Every mode is a single
 * epoll loop, bounded by a count and a deadline, that prints one JSON line.
 *
 *   tcp-target PORT
 *       A TCP server.  A connection whose first byte is 'Q' is a short
 *       request: once REQUEST_SIZE bytes have come, it gets REQUEST_SIZE bytes
 *       back and is closed.  A connection whose first byte is 'H' is held: the
 *       byte is echoed and the connection stays open until the peer closes.
 *       Runs until killed.
 *   udp-echo PORT
 *       Echoes every datagram to its sender (the payload behind a PROXY v2
 *       header, if one leads it).  Runs until killed.
 *   cps HOST PORT COUNT CONCURRENCY TIMEOUT_MS
 *       COUNT short connections, CONCURRENCY at a time: connect, send a
 *       request, read the whole reply and the server's FIN, close.
 *   open HOST PORT COUNT CONCURRENCY TIMEOUT_MS
 *       Open COUNT held connections (at most CONCURRENCY being set up at
 *       once) and wait until each has its echo.  Prints the result, then keeps
 *       them open until standard input reaches end of file.
 *   udp-load HOST PORT SOURCES SECONDS WINDOW TIMEOUT_MS
 *       SOURCES connected UDP sockets take turns sending 64-byte datagrams,
 *       with at most WINDOW awaiting their echo at once; a datagram whose
 *       echo has not come after TIMEOUT_MS is counted lost.
 *
 *   --prefix FILE, before cps or open: every connection first sends FILE's
 *   contents (an encrypted-target gateway's line) with its request, and
 *   expects the gateway's answer "200\n" before the reply; a reply that is
 *   short or answers anything else counts as a short reply.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "loopback.h"

#define REQUEST_SIZE 100
#define DATAGRAM_SIZE 64
#define MAX_EVENTS 512

/* What a client sends before its request, and the answer it then expects
 * first (--prefix); both empty by default. */
static char *prefix = "";
static size_t prefix_length = 0;
static const char *answer = "";
static size_t answer_length = 0;

static void raise_fd_limit(void) {
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
}

static int listen_on(int type, int port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK, 0);
    int one = 1;
    if (fd < 0) die("socket");
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = loopback_address("127.0.0.1", port);
    if (bind(fd, (struct sockaddr *)&address, sizeof address) < 0) die("bind");
    if (type == SOCK_STREAM && listen(fd, 4096) < 0) die("listen");
    return fd;
}

static void watch(int epoll, int fd, uint32_t events) {
    struct epoll_event event = {.events = events, .data.fd = fd};
    if (epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event) < 0) die("epoll_ctl");
}

/* ---------------------------------------------------------------- targets */

static _Noreturn void tcp_target(int port) {
    int listener = listen_on(SOCK_STREAM, port);
    int epoll = epoll_create1(0);
    struct rlimit limit;
    getrlimit(RLIMIT_NOFILE, &limit);
    size_t slots = limit.rlim_cur;
    /* Bytes of a request received so far, per descriptor; -1: held. */
    int *received = calloc(slots, sizeof *received);
    char buffer[4096], reply[REQUEST_SIZE];
    memset(reply, 'R', sizeof reply);
    watch(epoll, listener, EPOLLIN);
    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int ready = epoll_wait(epoll, events, MAX_EVENTS, -1);
        for (int i = 0; i < ready; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int client;
                while ((client = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if ((size_t)client >= slots) {
                        close(client);
                        continue;
                    }
                    received[client] = 0;
                    watch(epoll, client, EPOLLIN);
                }
                continue;
            }
            ssize_t n = read(fd, buffer, sizeof buffer);
            if (n < 0 && errno == EAGAIN) continue;
            if (n <= 0) {
                close(fd);
                continue;
            }
            if (received[fd] == 0 && buffer[0] == 'H') {
                received[fd] = -1;
                if (write(fd, "H", 1) != 1) close(fd);
                continue;
            }
            if (received[fd] < 0) continue; /* a held connection sent more */
            received[fd] += n;
            if (received[fd] >= REQUEST_SIZE) {
                if (write(fd, reply, sizeof reply) < 0) { /* the close says it */ }
                close(fd);
            }
        }
    }
}

static const char PROXY_V2_SIGNATURE[12] = "\r\n\r\n\0\r\nQUIT\n";

static _Noreturn void udp_echo(int port) {
    int fd = listen_on(SOCK_DGRAM, port);
    int size = 8 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    int flags = fcntl(fd, F_GETFL);
    fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    enum { BATCH = 64 };
    struct mmsghdr messages[BATCH];
    struct iovec iovecs[BATCH];
    struct sockaddr_in peers[BATCH];
    static char buffers[BATCH][2048];
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iovecs[i] = (struct iovec){buffers[i], sizeof buffers[i]};
            messages[i].msg_hdr = (struct msghdr){
                .msg_name = &peers[i], .msg_namelen = sizeof peers[i],
                .msg_iov = &iovecs[i], .msg_iovlen = 1};
        }
        int got = recvmmsg(fd, messages, BATCH, MSG_WAITFORONE, NULL);
        if (got <= 0) continue;
        for (int i = 0; i < got; i++) {
            /* Echo the payload: a PROXY v2 header in front of it (a relay's
             * udp_proxy_protocol) is read and left out, as a server that
             * understands it would. */
            size_t length = messages[i].msg_len, skip = 0;
            const unsigned char *data = (const unsigned char *)buffers[i];
            if (length >= 16 && memcmp(data, PROXY_V2_SIGNATURE, 12) == 0)
                skip = 16 + ((size_t)data[14] << 8 | data[15]);
            if (skip > length) skip = length;
            iovecs[i] = (struct iovec){buffers[i] + skip, length - skip};
        }
        sendmmsg(fd, messages, got, 0);
    }
}

/* ------------------------------------------------------------ TCP clients */

enum { IDLE, CONNECTING, WAITING, DONE };

typedef struct {
    int fd;
    int state;
    int received;
    double deadline;
} Connection;

typedef struct {
    long ok, refused, reset, timeout, short_reply, other;
} Errors;

static long error_total(const Errors *e) {
    return e->refused + e->reset + e->timeout + e->short_reply + e->other;
}

static void count_error(Errors *errors, int error) {
    if (error == ECONNREFUSED) errors->refused++;
    else if (error == ECONNRESET || error == EPIPE) errors->reset++;
    else if (error == ETIMEDOUT) errors->timeout++;
    else errors->other++;
}

static int start_connect(int epoll, const struct sockaddr_in *address, Connection *c,
                         double timeout, Errors *errors) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        count_error(errors, errno);
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)address, sizeof *address) < 0 && errno != EINPROGRESS) {
        count_error(errors, errno);
        close(fd);
        return -1;
    }
    c->fd = fd;
    c->state = CONNECTING;
    c->received = 0;
    c->deadline = now() + timeout;
    /* Edge-triggered for both directions: one registration per connection.
       Writable means connected (or failed: the write then says why). */
    struct epoll_event event = {.events = EPOLLOUT | EPOLLIN | EPOLLET, .data.ptr = c};
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
    return 0;
}

static void finish(Connection *c) {
    close(c->fd); /* also leaves the epoll set */
    c->fd = -1;
    c->state = DONE;
}

/* Load --prefix FILE: the gateway line sent first, and the answer expected. */
static void load_prefix(const char *path) {
    FILE *file = fopen(path, "rb");
    if (file == NULL) die(path);
    prefix = malloc(4096);
    prefix_length = fread(prefix, 1, 4096, file);
    fclose(file);
    if (prefix_length == 0 || prefix_length == 4096) {
        fprintf(stderr, "%s: expected a line of under 4096 bytes\n", path);
        exit(2);
    }
    answer = "200\n";
    answer_length = strlen(answer);
}

/* The prefix, then length bytes of body: what each connection sends. */
static char *with_prefix(const char *body, size_t length) {
    char *message = malloc(prefix_length + length);
    memcpy(message, prefix, prefix_length);
    memcpy(message + prefix_length, body, length);
    return message;
}

/* Whether n bytes read after the first received ones agree with the answer
 * expected at the start of the reply. */
static int answer_agrees(int received, const char *data, ssize_t n) {
    for (ssize_t i = 0; i < n && (size_t)received + i < answer_length; i++)
        if (data[i] != answer[received + i]) return 0;
    return 1;
}

static void print_errors(const Errors *e) {
    printf("\"ok\": %ld, \"errors\": %ld, \"refused\": %ld, \"reset\": %ld, \"timeout\": %ld, "
           "\"short_reply\": %ld, \"other\": %ld",
           e->ok, error_total(e), e->refused, e->reset, e->timeout, e->short_reply, e->other);
}

/* Handle an event on a short-request connection; returns 1 when it ended. */
static int cps_event(Connection *c, Errors *errors, const char *request) {
    ssize_t request_length = prefix_length + REQUEST_SIZE;
    char buffer[REQUEST_SIZE * 2];
    if (c->state == CONNECTING) {
        if (write(c->fd, request, request_length) != request_length) {
            if (errno == EAGAIN) return 0; /* not connected yet */
            count_error(errors, errno);
            finish(c);
            return 1;
        }
        c->state = WAITING;
    }
    for (;;) {
        ssize_t n = read(c->fd, buffer, sizeof buffer);
        if (n > 0) {
            if (!answer_agrees(c->received, buffer, n)) break;
            c->received += n;
            continue;
        }
        if (n < 0 && errno == EAGAIN) return 0;
        if (n < 0) count_error(errors, errno);
        else if (c->received != (int)answer_length + REQUEST_SIZE) errors->short_reply++;
        else errors->ok++;
        finish(c);
        return 1;
    }
    errors->short_reply++; /* not the answer expected */
    finish(c);
    return 1;
}

static int run_cps(const char *host, int port, long count, int concurrency, int timeout_ms) {
    struct sockaddr_in address = loopback_address(host, port);
    int epoll = epoll_create1(0);
    Connection *slots = calloc(concurrency, sizeof *slots);
    Errors errors = {0};
    long started = 0, ended = 0;
    double timeout = timeout_ms / 1000.0, begin = now();
    double give_up = begin + timeout + count * 0.01; /* at least 100 per second */
    char body[REQUEST_SIZE] = {'Q'};
    char *request = with_prefix(body, sizeof body);
    for (int i = 0; i < concurrency; i++) slots[i].state = IDLE;
    struct epoll_event events[MAX_EVENTS];
    while (ended < count && now() < give_up) {
        for (int i = 0; i < concurrency && started < count; i++) {
            if (slots[i].state == IDLE || slots[i].state == DONE) {
                started++;
                if (start_connect(epoll, &address, &slots[i], timeout, &errors) < 0) {
                    ended++;
                    slots[i].state = DONE;
                }
            }
        }
        int ready = epoll_wait(epoll, events, MAX_EVENTS, 10);
        for (int i = 0; i < ready; i++)
            ended += cps_event(events[i].data.ptr, &errors, request);
        double t = now();
        for (int i = 0; i < concurrency; i++) {
            Connection *c = &slots[i];
            if ((c->state == CONNECTING || c->state == WAITING) && t > c->deadline) {
                errors.timeout++;
                finish(c);
                ended++;
            }
        }
    }
    double seconds = now() - begin;
    for (int i = 0; i < concurrency; i++)
        if (slots[i].state == CONNECTING || slots[i].state == WAITING) {
            errors.timeout++;
            finish(&slots[i]);
        }
    errors.timeout += count - started;
    free(slots);
    free(request);
    printf("{\"connections\": %ld, \"seconds\": %.6f, \"per_second\": %.1f, ", count, seconds,
           errors.ok / seconds);
    print_errors(&errors);
    printf("}\n");
    return 0;
}

/* Handle an event on a held connection being set up; returns 1 once settled. */
static int open_event(int epoll, Connection *c, Errors *errors, const char *request) {
    ssize_t request_length = prefix_length + 1;
    char buffer[16];
    if (c->state == CONNECTING) {
        if (write(c->fd, request, request_length) != request_length) {
            if (errno == EAGAIN) return 0; /* not connected yet */
            count_error(errors, errno);
            finish(c);
            return 1;
        }
        c->state = WAITING;
    }
    ssize_t n;
    while ((n = read(c->fd, buffer, sizeof buffer)) > 0 && answer_agrees(c->received, buffer, n)) {
        c->received += n;
        if ((size_t)c->received <= answer_length) continue; /* the answer so far; the echo comes next */
        if ((size_t)c->received == answer_length + 1 && buffer[n - 1] == 'H') {
            errors->ok++;
            epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
            c->state = DONE; /* open and idle; closed at exit */
            return 1;
        }
        break;
    }
    if (n < 0 && errno == EAGAIN) return 0;
    if (n < 0) count_error(errors, errno);
    else errors->short_reply++;
    finish(c);
    return 1;
}

static int run_open(const char *host, int port, long count, int concurrency, int timeout_ms) {
    struct sockaddr_in address = loopback_address(host, port);
    int epoll = epoll_create1(0);
    Connection *connections = calloc(count, sizeof *connections);
    Errors errors = {0};
    long started = 0, settled = 0;
    double timeout = timeout_ms / 1000.0, begin = now(), give_up = begin + timeout * 3;
    char *request = with_prefix("H", 1);
    struct epoll_event events[MAX_EVENTS];
    while (settled < count && now() < give_up) {
        while (started < count && started - settled < concurrency) {
            if (start_connect(epoll, &address, &connections[started], timeout, &errors) < 0) {
                connections[started].state = DONE;
                connections[started].fd = -1;
                settled++;
            }
            started++;
        }
        int ready = epoll_wait(epoll, events, MAX_EVENTS, 10);
        for (int i = 0; i < ready; i++) settled += open_event(epoll, events[i].data.ptr, &errors, request);
        double t = now();
        for (long i = 0; i < started; i++) {
            Connection *c = &connections[i];
            if ((c->state == CONNECTING || c->state == WAITING) && t > c->deadline) {
                errors.timeout++;
                finish(c);
                settled++;
            }
        }
    }
    double seconds = now() - begin;
    errors.timeout += count - settled;
    printf("{\"connections\": %ld, \"seconds\": %.6f, ", count, seconds);
    print_errors(&errors);
    printf("}\n");
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) != NULL) {
    }
    for (long i = 0; i < count; i++)
        if (connections[i].fd >= 0 && connections[i].state != IDLE) close(connections[i].fd);
    free(connections);
    free(request);
    return 0;
}

/* ------------------------------------------------------------- UDP client */

typedef struct {
    uint64_t sequence; /* 0: slot free */
    double sent;
} Flight;

static int run_udp_load(const char *host, int port, int sources, double seconds, int window,
                        int timeout_ms) {
    struct sockaddr_in address = loopback_address(host, port);
    int epoll = epoll_create1(0);
    int *fds = malloc(sources * sizeof *fds);
    for (int i = 0; i < sources; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fds[i] < 0) die("socket");
        if (connect(fds[i], (struct sockaddr *)&address, sizeof address) < 0) die("connect");
        struct epoll_event event = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(epoll, EPOLL_CTL_ADD, fds[i], &event);
    }
    Flight *flights = calloc(window, sizeof *flights);
    long sent = 0, received = 0, lost = 0, late = 0, in_flight = 0, send_errors = 0;
    uint64_t next_sequence = 1;
    int next_source = 0;
    double timeout = timeout_ms / 1000.0, begin = now(), stop = begin + seconds;
    double drain_until = stop + timeout, last_sweep = begin, t = begin;
    char datagram[DATAGRAM_SIZE] = {0}, buffer[2048];
    struct epoll_event events[MAX_EVENTS];
    while ((t = now()) < stop || (in_flight > 0 && t < drain_until)) {
        /* Fill the window: each datagram from the next source in turn. */
        for (int slot = 0; t < stop && slot < window && in_flight < window; slot++) {
            if (flights[slot].sequence != 0) continue;
            uint64_t sequence = next_sequence++;
            memcpy(datagram, &sequence, sizeof sequence);
            memcpy(datagram + 8, &slot, sizeof slot);
            if (send(fds[next_source], datagram, sizeof datagram, 0) != sizeof datagram) {
                send_errors++;
                continue;
            }
            next_source = (next_source + 1) % sources;
            flights[slot] = (Flight){sequence, t};
            sent++;
            in_flight++;
        }
        int ready = epoll_wait(epoll, events, MAX_EVENTS, 1);
        for (int i = 0; i < ready; i++) {
            /* One datagram per event: epoll is level-triggered, so a socket
               with more queued is reported again, and no recv ends in EAGAIN. */
            ssize_t n = recv(fds[events[i].data.u32], buffer, sizeof buffer, 0);
            if (n >= (ssize_t)sizeof(uint64_t) + 4) {
                uint64_t sequence;
                int slot;
                memcpy(&sequence, buffer, sizeof sequence);
                memcpy(&slot, buffer + 8, sizeof slot);
                if (slot >= 0 && slot < window && flights[slot].sequence == sequence) {
                    flights[slot].sequence = 0;
                    received++;
                    in_flight--;
                } else {
                    late++;
                }
            }
        }
        t = now();
        if (t - last_sweep > timeout / 4) {
            last_sweep = t;
            for (int slot = 0; slot < window; slot++)
                if (flights[slot].sequence != 0 && t - flights[slot].sent > timeout) {
                    flights[slot].sequence = 0;
                    lost++;
                    in_flight--;
                }
        }
    }
    lost += in_flight;
    double elapsed = (t < stop ? t : stop) - begin;
    printf("{\"sources\": %d, \"seconds\": %.6f, \"sent\": %ld, \"received\": %ld, "
           "\"lost\": %ld, \"late\": %ld, \"send_errors\": %ld, \"per_second\": %.1f, "
           "\"loss_pct\": %.4f}\n",
           sources, elapsed, sent, received, lost, late, send_errors, received / elapsed,
           sent ? 100.0 * lost / sent : 0.0);
    for (int i = 0; i < sources; i++) close(fds[i]);
    free(fds);
    free(flights);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    raise_fd_limit();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc >= 4 && strcmp(argv[1], "--prefix") == 0 &&
        (strcmp(argv[3], "cps") == 0 || strcmp(argv[3], "open") == 0)) {
        load_prefix(argv[2]);
        argc -= 2;
        argv += 2;
    }
    if (argc == 3 && strcmp(argv[1], "tcp-target") == 0) tcp_target(atoi(argv[2]));
    if (argc == 3 && strcmp(argv[1], "udp-echo") == 0) udp_echo(atoi(argv[2]));
    if (argc == 7 && strcmp(argv[1], "cps") == 0)
        return run_cps(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc == 7 && strcmp(argv[1], "open") == 0)
        return run_open(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]));
    if (argc == 8 && strcmp(argv[1], "udp-load") == 0)
        return run_udp_load(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]), atoi(argv[6]),
                            atoi(argv[7]));
    fprintf(stderr,
            "usage: loadgen tcp-target PORT | udp-echo PORT\n"
            "       loadgen [--prefix FILE] cps|open HOST PORT COUNT CONCURRENCY TIMEOUT_MS\n"
            "       loadgen udp-load HOST PORT SOURCES SECONDS WINDOW TIMEOUT_MS\n");
    return 2;
}
