/*
 * TLS load and a plain one-way target for the streamrelay benchmark
 * (loopback only).
 *
 * Compiled at run time by tests/benchmarks/tools.py, with OpenSSL, when a
 * TLS workload runs.  Clients make full handshakes (no session is reused),
 * verify the certificate against CA_FILE for NAME (also sent as SNI), and
 * print one JSON line.
 *
 *   bulk-target PORT
 *       A plain TCP server for one-way transfers, one connection at a time.
 *       A client sends 'U' or 'D' and an 8-byte size (big-endian).  'U': the
 *       server reads SIZE bytes, sends one byte once it has them all, then
 *       the SHA-256 of what it read; 'D': it sends SIZE bytes of the stream.
 *       Then it closes.  Runs until killed.
 *   cps HOST PORT COUNT CONCURRENCY TIMEOUT_MS CA_FILE NAME
 *       COUNT short TLS connections, CONCURRENCY at a time: connect,
 *       handshake, send a 100-byte request (loadgen's tcp-target answers it),
 *       read the 100-byte reply and the end of the stream, send close_notify
 *       and close.
 *   bulk HOST PORT up|down SIZE CA_FILE NAME
 *       One TLS connection to a bulk-target: SIZE bytes of the stream up or
 *       down, timed from the request to the last byte (or the target's
 *       acknowledgement), then the SHA-256 of what arrived is compared.
 *
 * The stream is made of 1 MiB blocks of pseudo-random bytes, each starting
 * with its number, so a lost, repeated or reordered block changes the
 * digest.  The receiving end keeps the whole stream in memory (its pages
 * touched beforehand) and hashes it after the timed part, so hashing does
 * not hold the transfer back.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
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
#define BLOCK (1 << 20)
#define PAGE 4096
#define MAX_EVENTS 512
#define IO_TIMEOUT_S 60

static _Noreturn void die_tls(const char *what) {
    fprintf(stderr, "%s: ", what);
    ERR_print_errors_fp(stderr);
    fprintf(stderr, "\n");
    exit(2);
}

/* Bound every blocking read and write, so no transfer can hang for ever. */
static void set_io_timeout(int fd) {
    struct timeval timeout = {.tv_sec = IO_TIMEOUT_S};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
}

/* ----------------------------------------------------------------- stream */

/* The first block of the stream (later ones differ in their number only). */
static unsigned char *first_block(void) {
    unsigned char *block = malloc(BLOCK);
    uint64_t state = 0x9E3779B97F4A7C15u;
    for (size_t i = 0; i < BLOCK; i += 8) {
        state ^= state << 13, state ^= state >> 7, state ^= state << 17; /* xorshift64 */
        memcpy(block + i, &state, 8);
    }
    return block;
}

static void number_block(unsigned char *block, uint64_t number) {
    for (int i = 0; i < 8; i++) block[i] = (unsigned char)(number >> (56 - 8 * i));
}

/* The stream's block NUMBER, of at most the LEFT bytes still to go; its length. */
static size_t stream_block(unsigned char *block, uint64_t number, uint64_t left) {
    number_block(block, number);
    return left < BLOCK ? (size_t)left : BLOCK;
}

static void sha256(const unsigned char *data, size_t length, unsigned char digest[32]) {
    unsigned int digest_length = 32;
    if (!EVP_Digest(data, length, digest, &digest_length, EVP_sha256(), NULL)) die_tls("sha256");
}

static void stream_digest(uint64_t size, unsigned char digest[32]) {
    unsigned char *block = first_block();
    EVP_MD_CTX *context = EVP_MD_CTX_new();
    EVP_DigestInit_ex(context, EVP_sha256(), NULL);
    for (uint64_t number = 0, done = 0; done < size; number++) {
        size_t length = stream_block(block, number, size - done);
        EVP_DigestUpdate(context, block, length);
        done += length;
    }
    EVP_DigestFinal_ex(context, digest, NULL);
    EVP_MD_CTX_free(context);
    free(block);
}

/* A buffer for SIZE bytes with every page already mapped (no page faults while timed). */
static unsigned char *receive_buffer(uint64_t size) {
    unsigned char *buffer = malloc(size ? size : 1);
    if (buffer == NULL) die("malloc");
    for (uint64_t i = 0; i < size; i += PAGE) buffer[i] = 0;
    return buffer;
}

/* ------------------------------------------------------------ bulk target */

static int read_fully(int fd, void *buffer, size_t length) {
    for (size_t done = 0; done < length;) {
        ssize_t n = read(fd, (char *)buffer + done, length - done);
        if (n <= 0) return -1;
        done += n;
    }
    return 0;
}

static int write_fully(int fd, const void *buffer, size_t length) {
    for (size_t done = 0; done < length;) {
        ssize_t n = write(fd, (const char *)buffer + done, length - done);
        if (n <= 0) return -1;
        done += n;
    }
    return 0;
}

static void serve_transfer(int fd, unsigned char *block) {
    unsigned char header[9], digest[32];
    if (read_fully(fd, header, sizeof header) < 0) return;
    uint64_t size = 0;
    for (int i = 1; i < 9; i++) size = size << 8 | header[i];
    if (header[0] == 'U') {
        unsigned char *received = receive_buffer(size);
        int complete = read_fully(fd, received, size) == 0 && write_fully(fd, "A", 1) == 0;
        if (complete) {
            sha256(received, size, digest);
            write_fully(fd, digest, sizeof digest);
        }
        free(received);
    } else if (header[0] == 'D') {
        for (uint64_t number = 0, done = 0; done < size; number++) {
            size_t length = stream_block(block, number, size - done);
            if (write_fully(fd, block, length) < 0) return;
            done += length;
        }
    } else {
        return;
    }
    /* Wait for the client to close first, as a server that answered would. */
    shutdown(fd, SHUT_WR);
    char rest[16];
    while (read(fd, rest, sizeof rest) > 0) {
    }
}

static _Noreturn void bulk_target(int port) {
    int listener = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (listener < 0) die("socket");
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in address = loopback_address("127.0.0.1", port);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) < 0) die("bind");
    if (listen(listener, 16) < 0) die("listen");
    unsigned char *block = first_block();
    for (;;) {
        int fd = accept(listener, NULL, NULL);
        if (fd < 0) continue;
        set_io_timeout(fd);
        serve_transfer(fd, block);
        close(fd);
    }
}

/* ------------------------------------------------------------ TLS clients */

static SSL_CTX *client_context(const char *ca_file) {
    SSL_CTX *context = SSL_CTX_new(TLS_client_method());
    if (context == NULL) die_tls("SSL_CTX_new");
    if (SSL_CTX_load_verify_locations(context, ca_file, NULL) != 1) die_tls(ca_file);
    SSL_CTX_set_verify(context, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(context, SSL_SESS_CACHE_OFF); /* a full handshake every time */
    /* A relay that ends the stream with a bare FIN after the reply is not an
       error here: the reply's length is what is checked. */
    SSL_CTX_set_options(context, SSL_OP_IGNORE_UNEXPECTED_EOF);
    return context;
}

static SSL *client_session(SSL_CTX *context, int fd, const char *name) {
    SSL *ssl = SSL_new(context);
    if (ssl == NULL || SSL_set_fd(ssl, fd) != 1 || SSL_set_tlsext_host_name(ssl, name) != 1 ||
        SSL_set1_host(ssl, name) != 1)
        die_tls("SSL_new");
    SSL_set_connect_state(ssl);
    return ssl;
}

enum { IDLE, HANDSHAKE, SENDING, READING, DONE };

typedef struct {
    int fd;
    int state;
    int received;
    double deadline;
    SSL *ssl;
} Connection;

typedef struct {
    long ok, refused, reset, timeout, short_reply, tls, other;
} Errors;

static long error_total(const Errors *e) {
    return e->refused + e->reset + e->timeout + e->short_reply + e->tls + e->other;
}

static void count_error(Errors *errors, int error) {
    if (error == ECONNREFUSED) errors->refused++;
    else if (error == ECONNRESET || error == EPIPE) errors->reset++;
    else if (error == ETIMEDOUT) errors->timeout++;
    else errors->other++;
}

/* Count a failed TLS call; OpenSSL's first reason is written once to stderr. */
static void count_tls_error(Errors *errors, SSL *ssl, int result) {
    static int reported = 0;
    int error = SSL_get_error(ssl, result);
    if (error == SSL_ERROR_SYSCALL && errno != 0) {
        count_error(errors, errno);
    } else {
        errors->tls++;
        if (!reported++) {
            fprintf(stderr, "TLS error %d: ", error);
            ERR_print_errors_fp(stderr);
            fprintf(stderr, "\n");
        }
    }
    ERR_clear_error();
}

static void finish(Connection *c) {
    SSL_free(c->ssl);
    close(c->fd); /* also leaves the epoll set */
    c->ssl = NULL;
    c->fd = -1;
    c->state = DONE;
}

static int start_connect(int epoll, const struct sockaddr_in *address, Connection *c, SSL_CTX *context,
                         const char *name, double timeout, Errors *errors) {
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
    *c = (Connection){.fd = fd, .state = HANDSHAKE, .deadline = now() + timeout,
                      .ssl = client_session(context, fd, name)};
    /* Edge-triggered for both directions: a TLS call that wanted either
       direction is retried on the next event. */
    struct epoll_event event = {.events = EPOLLOUT | EPOLLIN | EPOLLET, .data.ptr = c};
    epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event);
    return 0;
}

/* Whether a TLS call's RESULT means: try again on the next event. */
static int wants_more(SSL *ssl, int result) {
    int error = SSL_get_error(ssl, result);
    return error == SSL_ERROR_WANT_READ || error == SSL_ERROR_WANT_WRITE;
}

/* Take a short connection as far as it goes; returns 1 when it ended. */
static int cps_event(Connection *c, Errors *errors, const char *request) {
    int result;
    char buffer[REQUEST_SIZE * 2];
    if (c->state == HANDSHAKE) {
        if ((result = SSL_connect(c->ssl)) != 1) goto failed;
        c->state = SENDING;
    }
    if (c->state == SENDING) {
        if ((result = SSL_write(c->ssl, request, REQUEST_SIZE)) <= 0) goto failed;
        c->state = READING;
    }
    while ((result = SSL_read(c->ssl, buffer, sizeof buffer)) > 0) c->received += result;
    if (SSL_get_error(c->ssl, result) == SSL_ERROR_ZERO_RETURN) {
        if (c->received == REQUEST_SIZE) errors->ok++;
        else errors->short_reply++;
        SSL_shutdown(c->ssl); /* our close_notify; the relay may have gone already */
        ERR_clear_error();
        finish(c);
        return 1;
    }
failed:
    if (wants_more(c->ssl, result)) return 0;
    count_tls_error(errors, c->ssl, result);
    finish(c);
    return 1;
}

static void print_errors(const Errors *e) {
    printf("\"ok\": %ld, \"errors\": %ld, \"refused\": %ld, \"reset\": %ld, \"timeout\": %ld, "
           "\"short_reply\": %ld, \"tls\": %ld, \"other\": %ld",
           e->ok, error_total(e), e->refused, e->reset, e->timeout, e->short_reply, e->tls, e->other);
}

static int run_cps(const char *host, int port, long count, int concurrency, int timeout_ms,
                   const char *ca_file, const char *name) {
    struct sockaddr_in address = loopback_address(host, port);
    SSL_CTX *context = client_context(ca_file);
    int epoll = epoll_create1(0);
    Connection *slots = calloc(concurrency, sizeof *slots);
    Errors errors = {0};
    long started = 0, ended = 0;
    double timeout = timeout_ms / 1000.0, begin = now();
    double give_up = begin + timeout + count * 0.02; /* at least 50 per second */
    char request[REQUEST_SIZE] = {'Q'};
    for (int i = 0; i < concurrency; i++) slots[i].state = IDLE;
    struct epoll_event events[MAX_EVENTS];
    while (ended < count && now() < give_up) {
        for (int i = 0; i < concurrency && started < count; i++) {
            if (slots[i].state == IDLE || slots[i].state == DONE) {
                started++;
                if (start_connect(epoll, &address, &slots[i], context, name, timeout, &errors) < 0) {
                    ended++;
                    slots[i].state = DONE;
                }
            }
        }
        int ready = epoll_wait(epoll, events, MAX_EVENTS, 10);
        for (int i = 0; i < ready; i++) ended += cps_event(events[i].data.ptr, &errors, request);
        double t = now();
        for (int i = 0; i < concurrency; i++) {
            Connection *c = &slots[i];
            if (c->state != IDLE && c->state != DONE && t > c->deadline) {
                errors.timeout++;
                finish(c);
                ended++;
            }
        }
    }
    double seconds = now() - begin;
    for (int i = 0; i < concurrency; i++)
        if (slots[i].state != IDLE && slots[i].state != DONE) {
            errors.timeout++;
            finish(&slots[i]);
        }
    errors.timeout += count - started;
    free(slots);
    SSL_CTX_free(context);
    printf("{\"connections\": %ld, \"seconds\": %.6f, \"per_second\": %.1f, ", count, seconds,
           errors.ok / seconds);
    print_errors(&errors);
    printf("}\n");
    return 0;
}

static void tls_read_fully(SSL *ssl, unsigned char *buffer, uint64_t length) {
    for (uint64_t done = 0; done < length;) {
        int chunk = length - done < (1u << 30) ? (int)(length - done) : 1 << 30;
        int n = SSL_read(ssl, buffer + done, chunk);
        if (n <= 0) die_tls("stream ended early");
        done += n;
    }
}

static int run_bulk(const char *host, int port, const char *direction, uint64_t size, const char *ca_file,
                    const char *name) {
    int up = strcmp(direction, "up") == 0;
    if (!up && strcmp(direction, "down") != 0) {
        fprintf(stderr, "direction: up or down, not %s\n", direction);
        return 2;
    }
    unsigned char expected[32], digest[32], ack;
    stream_digest(size, expected);
    unsigned char *block = up ? first_block() : NULL;
    unsigned char *received = up ? NULL : receive_buffer(size);
    struct sockaddr_in address = loopback_address(host, port);
    SSL_CTX *context = client_context(ca_file);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, (struct sockaddr *)&address, sizeof address) < 0) die("connect");
    set_io_timeout(fd);
    SSL *ssl = client_session(context, fd, name);
    if (SSL_connect(ssl) != 1) die_tls("handshake");
    unsigned char header[9] = {up ? 'U' : 'D'};
    for (int i = 1; i < 9; i++) header[i] = (unsigned char)(size >> (64 - 8 * i));
    double began = now();
    if (SSL_write(ssl, header, sizeof header) <= 0) die_tls("request");
    if (up) {
        for (uint64_t number = 0, done = 0; done < size; number++) {
            size_t length = stream_block(block, number, size - done);
            if (SSL_write(ssl, block, (int)length) <= 0) die_tls("send");
            done += length;
        }
        tls_read_fully(ssl, &ack, 1);
    } else {
        tls_read_fully(ssl, received, size);
    }
    double seconds = now() - began;
    if (up) tls_read_fully(ssl, digest, sizeof digest);
    else sha256(received, size, digest);
    /* The end of the stream before our close_notify: closing with its
       close_notify unread would reset the connection. */
    if (SSL_read(ssl, &ack, 1) > 0) die_tls("more than the stream");
    SSL_shutdown(ssl);
    SSL_free(ssl);
    close(fd);
    SSL_CTX_free(context);
    free(block);
    free(received);
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"mismatches\": %d}\n", (unsigned long long)size, seconds,
           memcmp(digest, expected, sizeof digest) != 0);
    return 0;
}

int main(int argc, char **argv) {
    signal(SIGPIPE, SIG_IGN);
    struct rlimit limit;
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
        limit.rlim_cur = limit.rlim_max;
        setrlimit(RLIMIT_NOFILE, &limit);
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && strcmp(argv[1], "bulk-target") == 0) bulk_target(atoi(argv[2]));
    if (argc == 9 && strcmp(argv[1], "cps") == 0)
        return run_cps(argv[2], atoi(argv[3]), atol(argv[4]), atoi(argv[5]), atoi(argv[6]), argv[7], argv[8]);
    if (argc == 8 && strcmp(argv[1], "bulk") == 0)
        return run_bulk(argv[2], atoi(argv[3]), argv[4], strtoull(argv[5], NULL, 10), argv[6], argv[7]);
    fprintf(stderr,
            "usage: tlsload bulk-target PORT\n"
            "       tlsload cps HOST PORT COUNT CONCURRENCY TIMEOUT_MS CA_FILE NAME\n"
            "       tlsload bulk HOST PORT up|down SIZE CA_FILE NAME\n");
    return 2;
}
