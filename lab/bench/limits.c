/* The kernel's own reclaim limits, without Python in the way (see lab/bench/limits.py).
 *
 *   limits REGION_BYTES PER_PAGE_PAGES REPS [VARIANT,VARIANT,...]
 *
 * (with the fourth argument, only the named variants run: the bench measures the limits its
 * ratios use again beside each throughput case)
 *
 * On a shared memfd whose pages were all written first (so each is allocated and mapped, as
 * a guest's would be), time giving them back:
 *   contiguous: fallocate(PUNCH_HOLE|KEEP_SIZE) and madvise(MADV_REMOVE), whole region in one
 *               call and in 2 MiB calls (REGION_BYTES);
 *   per page:   PER_PAGE_PAGES isolated 4 KiB pages (every other page of a region twice that
 *               size, as the bench's scattered guest reserves them), one call each: madvise,
 *               fallocate, the madvise loop split over two threads, the same madvises
 *               submitted as one io_uring batch (IORING_OP_MADVISE) per 512 pages, and as
 *               one process_madvise(2) call per 1024 pages (what vdev's native loop does).
 * The guest's topology, in variants named *_guest_asleep / *_guest_running: the pages are
 * written through another process's mapping (a forked "guest", as QEMU's or a front-end's
 * RAM is), which during the timed calls either sleeps or keeps running on another CPU (a vCPU
 * at work). While it runs, every zap of its page-table entries needs a TLB shootdown (an IPI)
 * on its CPU: what a back-end's punch meets while the guest keeps working. These are reported
 * beside the limits, never chosen as one.
 * Each timing is checked with st_blocks (allocated before, freed after). Prints one JSON
 * object: {"variant": {"pages_per_s": median, "samples": [...], "verified": bool,
 * "writer": "self" | "guest asleep" | "guest running"}, ...}.
 * A variant the kernel refuses (e.g. io_uring disabled) prints {"error": "..."} instead.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif

#define PAGE 4096UL
#define HUGE_CHUNK (2UL << 20)
#define URING_BATCH 512U

static int fd;
static char *map;
static size_t size;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long allocated(void) {
    struct stat st;
    if (fstat(fd, &st) != 0) return -1;
    return (long)st.st_blocks * 512L;
}

static void touch(void) {
    for (size_t off = 0; off < size; off += PAGE) map[off] = (char)0xA5;
}

static void die(const char *what) {
    fprintf(stderr, "limits: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- the guest: a child that maps the region, writes its pages on 't' and spins on 'r'
 * until *spin drops to 0 (both acknowledged on a pipe); started on first use per region */
enum writer { SELF, GUEST_ASLEEP, GUEST_RUNNING };
static const char *const WRITER[] = {"self", "guest asleep", "guest running"};
static pid_t guest = -1;
static int guest_cmd = -1, guest_ack = -1;
static volatile int *spin;

static void guest_stop(void) {
    if (guest <= 0) return;
    close(guest_cmd);
    close(guest_ack);
    kill(guest, SIGKILL);
    waitpid(guest, NULL, 0);
    guest = -1;
}

static void guest_start(void) {
    int cmd[2], ack[2];
    if (!spin) {
        spin = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (spin == MAP_FAILED) die("mmap (spin word)");
    }
    if (pipe(cmd) != 0 || pipe(ack) != 0) die("pipe");
    guest = fork();
    if (guest < 0) die("fork");
    if (guest == 0) {
        char *m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        char c;
        if (m == MAP_FAILED) _exit(1);
        close(cmd[1]);
        close(ack[0]);
        while (read(cmd[0], &c, 1) == 1) {
            if (c == 't')
                for (size_t off = 0; off < size; off += PAGE) m[off] = (char)0xA5;
            if (write(ack[1], &c, 1) != 1) _exit(1);
            if (c == 'r')
                while (*spin) {
                }
        }
        _exit(0);
    }
    close(cmd[0]);
    close(ack[1]);
    guest_cmd = cmd[1];
    guest_ack = ack[0];
}

static void guest_do(char c) {
    char r;
    if (guest <= 0) guest_start();
    if (write(guest_cmd, &c, 1) != 1 || read(guest_ack, &r, 1) != 1 || r != c)
        die("guest process");
}

/* ---- contiguous variants: return bytes given back, or -errno */
static long fallocate_chunks(size_t chunk) {
    for (size_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)n) != 0)
            return -errno;
    }
    return (long)size;
}
static long madvise_chunks(size_t chunk) {
    for (size_t off = 0; off < size; off += chunk) {
        size_t n = size - off < chunk ? size - off : chunk;
        if (madvise(map + off, n, MADV_REMOVE) != 0) return -errno;
    }
    return (long)size;
}
static long v_fallocate_whole(size_t pages) { (void)pages; return fallocate_chunks(size); }
static long v_fallocate_2m(size_t pages) { (void)pages; return fallocate_chunks(HUGE_CHUNK); }
static long v_madvise_whole(size_t pages) { (void)pages; return madvise_chunks(size); }
static long v_madvise_2m(size_t pages) { (void)pages; return madvise_chunks(HUGE_CHUNK); }

/* ---- per isolated page: page i is at offset 2*i*PAGE */
static long v_madvise_page(size_t pages) {
    for (size_t i = 0; i < pages; i++)
        if (madvise(map + 2 * i * PAGE, PAGE, MADV_REMOVE) != 0) return -errno;
    return (long)(pages * PAGE);
}
static long v_fallocate_page(size_t pages) {
    for (size_t i = 0; i < pages; i++)
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(2 * i * PAGE),
                      (off_t)PAGE) != 0)
            return -errno;
    return (long)(pages * PAGE);
}

struct slice { size_t first, count; long rc; };
static void *madvise_slice(void *arg) {
    struct slice *s = arg;
    s->rc = 0;
    for (size_t i = s->first; i < s->first + s->count; i++)
        if (madvise(map + 2 * i * PAGE, PAGE, MADV_REMOVE) != 0) { s->rc = -errno; break; }
    return NULL;
}
static long v_madvise_page_2threads(size_t pages) {
    pthread_t t;
    struct slice a = {0, pages / 2, 0}, b = {pages / 2, pages - pages / 2, 0};
    if (pthread_create(&t, NULL, madvise_slice, &b) != 0) return -EAGAIN;
    madvise_slice(&a);
    pthread_join(t, NULL);
    if (a.rc) return a.rc;
    if (b.rc) return b.rc;
    return (long)(pages * PAGE);
}

/* ---- process_madvise(2) on our own pidfd: one call per 1024 isolated pages (an iovec each);
 * Linux >= 6.13 takes any advice, MADV_REMOVE included, for the calling process */
#define IOV_BATCH 1024
static long v_process_madvise_page(size_t pages) {
    int pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0U);
    if (pidfd < 0) return -errno;
    struct iovec iov[IOV_BATCH];
    for (size_t done = 0; done < pages;) {
        size_t n = pages - done < IOV_BATCH ? pages - done : IOV_BATCH;
        for (size_t k = 0; k < n; k++) {
            iov[k].iov_base = map + 2 * (done + k) * PAGE;
            iov[k].iov_len = PAGE;
        }
        long got = syscall(SYS_process_madvise, pidfd, iov, n, MADV_REMOVE, 0U);
        if (got != (long)(n * PAGE)) {
            long e = got < 0 ? -errno : -EIO;
            close(pidfd);
            return e;
        }
        done += n;
    }
    close(pidfd);
    return (long)(pages * PAGE);
}

/* ---- io_uring, raw syscalls (no liburing needed) */
struct uring {
    int fd;
    unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned entries;
};
static struct uring ring;
static int uring_ready = -1; /* -1 untried, 0 failed, 1 ok */
static int uring_errno;

static int uring_setup(void) {
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int rfd = (int)syscall(__NR_io_uring_setup, URING_BATCH, &p);
    if (rfd < 0) return -errno;
    size_t sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    size_t cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    char *sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, rfd,
                    IORING_OFF_SQ_RING);
    char *cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, rfd,
                    IORING_OFF_CQ_RING);
    void *sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_POPULATE, rfd, IORING_OFF_SQES);
    if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED) return -errno;
    ring.fd = rfd;
    ring.sq_tail = (unsigned *)(sq + p.sq_off.tail);
    ring.sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    ring.sq_array = (unsigned *)(sq + p.sq_off.array);
    ring.cq_head = (unsigned *)(cq + p.cq_off.head);
    ring.cq_tail = (unsigned *)(cq + p.cq_off.tail);
    ring.cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    ring.cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    ring.sqes = sqes;
    ring.entries = p.sq_entries;
    return 0;
}

static long v_uring_madvise_page(size_t pages) {
    if (uring_ready < 0) {
        int rc = uring_setup();
        uring_ready = rc == 0;
        uring_errno = -rc;
    }
    if (!uring_ready) return -uring_errno;
    for (size_t done = 0; done < pages;) {
        unsigned n = pages - done < URING_BATCH ? (unsigned)(pages - done) : URING_BATCH;
        unsigned tail = __atomic_load_n(ring.sq_tail, __ATOMIC_ACQUIRE);
        for (unsigned k = 0; k < n; k++) {
            unsigned idx = (tail + k) & *ring.sq_mask;
            struct io_uring_sqe *sqe = &ring.sqes[idx];
            memset(sqe, 0, sizeof *sqe);
            sqe->opcode = IORING_OP_MADVISE;
            sqe->fd = -1;
            sqe->addr = (uint64_t)(uintptr_t)(map + 2 * (done + k) * PAGE);
            sqe->len = PAGE;
            sqe->fadvise_advice = MADV_REMOVE;
            ring.sq_array[idx] = idx;
        }
        __atomic_store_n(ring.sq_tail, tail + n, __ATOMIC_RELEASE);
        long rc = syscall(__NR_io_uring_enter, ring.fd, n, n, IORING_ENTER_GETEVENTS, NULL, 0);
        if (rc < 0) return -errno;
        unsigned head = *ring.cq_head, seen = 0;
        long err = 0;
        while (seen < n) {
            unsigned ctail = __atomic_load_n(ring.cq_tail, __ATOMIC_ACQUIRE);
            for (; head != ctail && seen < n; head++, seen++) {
                int res = ring.cqes[head & *ring.cq_mask].res;
                if (res < 0 && !err) err = res;
            }
            __atomic_store_n(ring.cq_head, head, __ATOMIC_RELEASE);
            if (seen < n &&
                syscall(__NR_io_uring_enter, ring.fd, 0, n - seen, IORING_ENTER_GETEVENTS,
                        NULL, 0) < 0)
                return -errno;
        }
        if (err) return err;
        done += n;
    }
    return (long)(pages * PAGE);
}

struct variant {
    const char *name;
    long (*run)(size_t pages);
    int per_page;
    enum writer writer;
};

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static const char *only; /* comma-separated variant names, or NULL for all */

static int selected(const char *name) {
    if (!only) return 1;
    size_t n = strlen(name);
    for (const char *p = only; (p = strstr(p, name)) != NULL; p += n)
        if ((p == only || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) return 1;
    return 0;
}

static void run(const struct variant *v, size_t pages, int reps, int first) {
    double rates[64];
    int verified = 1;
    long err = 0;
    for (int r = 0; r < reps && r < 64; r++) {
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)size);
        if (v->writer == SELF) touch();
        else guest_do('t');
        if (v->writer == GUEST_RUNNING) {
            *spin = 1;
            guest_do('r');
        }
        long before = allocated();
        double t = now();
        long nbytes = v->run(pages);
        double dt = now() - t;
        if (v->writer == GUEST_RUNNING) *spin = 0;
        if (nbytes < 0) { err = -nbytes; break; }
        long after = allocated();
        verified &= before >= (long)size && before - after >= nbytes;
        rates[r] = (double)nbytes / PAGE / dt;
    }
    printf("%s\n  \"%s\": ", first ? "" : ",", v->name);
    if (err) {
        printf("{\"error\": \"%s\"}", strerror((int)err));
        return;
    }
    int n = reps < 64 ? reps : 64;
    qsort(rates, (size_t)n, sizeof rates[0], cmp);
    double med = n % 2 ? rates[n / 2] : (rates[n / 2 - 1] + rates[n / 2]) / 2;
    printf("{\"pages_per_s\": %.1f, \"per_page\": %s, \"verified\": %s, \"writer\": \"%s\", "
           "\"samples\": [",
           med, v->per_page ? "true" : "false", verified ? "true" : "false", WRITER[v->writer]);
    for (int r = 0; r < n; r++) printf("%s%.1f", r ? ", " : "", rates[r]);
    printf("]}");
}

/* every variant of vs[0..n) that the variant list selects, on the current region */
static void run_selected(const struct variant *vs, size_t n, size_t pages, int reps, int *first) {
    for (size_t i = 0; i < n; i++)
        if (selected(vs[i].name)) {
            run(&vs[i], pages, reps, *first);
            *first = 0;
        }
}

static void region(size_t bytes) {
    guest_stop();
    if (map) munmap(map, size);
    if (fd > 0) close(fd);
    size = bytes;
    fd = (int)syscall(SYS_memfd_create, "vballoon-bench-limits", 1U /* MFD_CLOEXEC */);
    if (fd < 0) die("memfd_create");
    if (ftruncate(fd, (off_t)size) != 0) die("ftruncate");
    map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) die("mmap");
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: limits REGION_BYTES PER_PAGE_PAGES REPS [VARIANT,...]\n");
        return 2;
    }
    if (argc == 5) only = argv[4];
    size_t bytes = strtoull(argv[1], NULL, 0) / HUGE_CHUNK * HUGE_CHUNK;
    size_t pages = strtoull(argv[2], NULL, 0);
    int reps = atoi(argv[3]);
    if (bytes == 0 || pages == 0 || reps <= 0) return 2;
    static const struct variant contiguous[] = {
        {"fallocate_whole", v_fallocate_whole, 0, SELF},
        {"fallocate_2MiB", v_fallocate_2m, 0, SELF},
        {"madvise_whole", v_madvise_whole, 0, SELF},
        {"madvise_2MiB", v_madvise_2m, 0, SELF},
        {"fallocate_2MiB_guest_asleep", v_fallocate_2m, 0, GUEST_ASLEEP},
        {"fallocate_2MiB_guest_running", v_fallocate_2m, 0, GUEST_RUNNING},
    };
    static const struct variant per_page[] = {
        {"madvise_per_page", v_madvise_page, 1, SELF},
        {"fallocate_per_page", v_fallocate_page, 1, SELF},
        {"madvise_per_page_2_threads", v_madvise_page_2threads, 1, SELF},
        {"io_uring_madvise_per_page", v_uring_madvise_page, 1, SELF},
        {"process_madvise_per_page", v_process_madvise_page, 1, SELF},
        {"fallocate_per_page_guest_asleep", v_fallocate_page, 1, GUEST_ASLEEP},
        {"fallocate_per_page_guest_running", v_fallocate_page, 1, GUEST_RUNNING},
        {"process_madvise_per_page_guest_running", v_process_madvise_page, 1, GUEST_RUNNING},
    };
    int first = 1;
    printf("{");
    region(bytes);
    run_selected(contiguous, sizeof contiguous / sizeof contiguous[0], bytes / PAGE, reps, &first);
    region(2 * pages * PAGE);
    run_selected(per_page, sizeof per_page / sizeof per_page[0], pages, reps, &first);
    guest_stop();
    printf("\n}\n");
    return 0;
}
