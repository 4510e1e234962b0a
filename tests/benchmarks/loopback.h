/*
 * What loadgen.c and tlsload.c share: the clock, dying with errno's reason,
 * and parsing a target address that must be on loopback.  Each program is
 * compiled alone (tests/benchmarks/tools.py), so these are static.
 */
#ifndef STREAMRELAY_BENCHMARK_LOOPBACK_H
#define STREAMRELAY_BENCHMARK_LOOPBACK_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

static struct sockaddr_in loopback_address(const char *host, int port) {
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &address.sin_addr) != 1) {
        fprintf(stderr, "not an IPv4 address: %s\n", host);
        exit(2);
    }
    if ((ntohl(address.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "refusing a non-loopback target: %s\n", host);
        exit(2);
    }
    return address;
}

#endif
