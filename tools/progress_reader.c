/*
 * progress_reader: follow a warmpool warm from C (protocol: docs/progress-protocol.md).
 *
 *   cc -std=c99 -Wall -Wextra -O2 tools/progress_reader.c -o progress_reader
 *   (glibc older than 2.34 keeps shm_open in librt: add -lrt)
 *
 *   progress_reader NAME [--layer K]
 *
 * Prints "done_bytes total_bytes state" on one line; with --layer K a second line
 * "layer K ready" or "layer K not-ready".  Exit 0, or 1 with one line on stderr.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_MIN 64u
#define COUNTER_SIZE 8u
#define CHUNK_SIZE 32u

static const char *const run_states[] = {"starting", "running", "done",
                                         "failed", "cancelled", "skipped"};

/* The layout is little-endian; memcpy keeps us clear of unaligned casts. */
static uint32_t u32_at(const unsigned char *p, size_t off) {
    uint32_t v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

static uint64_t u64_at(const unsigned char *p, size_t off) {
    uint64_t v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

static int32_t i32_at(const unsigned char *p, size_t off) {
    int32_t v;
    memcpy(&v, p + off, sizeof v);
    return v;
}

static int fail(const char *name, const char *why) {
    fprintf(stderr, "%s: %s\n", name, why);
    return 1;
}

/* Layer k is ready iff every chunk whose [layer_lo, layer_hi] holds k is done (2) or
 * skipped (4); a layer no chunk covers is ready. */
static int layer_ready(const unsigned char *chunks, uint32_t n_chunks, long k) {
    for (uint32_t i = 0; i < n_chunks; i++) {
        const unsigned char *c = chunks + (size_t)i * CHUNK_SIZE;
        unsigned state = c[4];
        if (i32_at(c, 8) <= k && k <= i32_at(c, 12) && state != 2 && state != 4)
            return 0;
    }
    return 1;
}

int main(int argc, char **argv) {
    const char *arg_name = NULL;
    const char *arg_layer = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--layer") == 0 && i + 1 < argc)
            arg_layer = argv[++i];
        else if (arg_name == NULL && argv[i][0] != '-')
            arg_name = argv[i];
        else
            return fail("progress_reader", "usage: progress_reader NAME [--layer K]");
    }
    if (arg_name == NULL)
        return fail("progress_reader", "usage: progress_reader NAME [--layer K]");

    char name[256];
    int n = snprintf(name, sizeof name, "%s%s", arg_name[0] == '/' ? "" : "/", arg_name);
    if (n < 0 || (size_t)n >= sizeof name)
        return fail(arg_name, "name too long");

    int fd = shm_open(name, O_RDONLY, 0);
    if (fd < 0)
        return fail(name, errno == ENOENT ? "not found (finished or never started)"
                                          : strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return fail(name, strerror(errno));
    }
    if (st.st_size < (off_t)HEADER_MIN) {
        close(fd);
        return fail(name, "truncated: smaller than a header");
    }
    size_t size = (size_t)st.st_size;
    const unsigned char *p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd); /* the mapping stays valid, even after the coordinator unlinks */
    if (p == MAP_FAILED)
        return fail(name, strerror(errno));

    if (memcmp(p, "WARMPOOL", 8) != 0)
        return fail(name, "not a warmpool progress segment: bad magic");
    if (u32_at(p, 8) != 1)
        return fail(name, "unknown protocol version");
    uint32_t header_size = u32_at(p, 12);
    uint32_t state = u32_at(p, 16);
    uint32_t n_workers = u32_at(p, 20);
    uint32_t n_chunks = u32_at(p, 24);
    uint32_t n_layers = u32_at(p, 28);
    /* u32 counts times small sizes cannot overflow 64 bits. */
    uint64_t needed = (uint64_t)header_size + (uint64_t)n_workers * COUNTER_SIZE +
                      (uint64_t)n_chunks * CHUNK_SIZE;
    if (header_size < HEADER_MIN || header_size % 8 != 0)
        return fail(name, "bad header_size");
    if (needed > (uint64_t)size)
        return fail(name, "truncated: smaller than its layout");
    if (state >= sizeof run_states / sizeof run_states[0])
        return fail(name, "unknown state");

    /* State (read above) before counters, as the protocol asks.  Plain loads suffice
     * for a snapshot on x86_64; on weakly ordered CPUs a reader that must see final
     * counters with a terminal state uses acquire loads (C11 atomic_load_explicit). */
    uint64_t total = u64_at(p, 32);
    uint64_t done = 0;
    for (uint32_t w = 0; w < n_workers; w++)
        done += u64_at(p, header_size + (size_t)w * COUNTER_SIZE);
    printf("%llu %llu %s\n", (unsigned long long)done, (unsigned long long)total,
           run_states[state]);

    if (arg_layer != NULL) {
        char *end;
        errno = 0;
        long k = strtol(arg_layer, &end, 10);
        if (errno != 0 || *end != '\0' || end == arg_layer || k < -1 || k > (long)n_layers)
            return fail(name, "--layer K: K must be an integer in -1..n_layers");
        const unsigned char *chunks = p + header_size + (size_t)n_workers * COUNTER_SIZE;
        printf("layer %ld %s\n", k, layer_ready(chunks, n_chunks, k) ? "ready" : "not-ready");
    }
    return 0;
}
