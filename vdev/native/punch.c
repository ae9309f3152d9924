/* vdev's reclaim loop in C (loaded by vdev/memory.py with ctypes; built by scripts/setup).
 *
 * A scattered batch is hundreds of isolated 4 KiB pages. This loop makes their kernel calls
 * without a Python round per page, and since ctypes releases the GIL for the whole call, a
 * worker thread punching here leaves the trio thread free.
 *
 * vb_punch punches n pieces of one mapping: piece i is [moff[i], moff[i] + len[i]) bytes from
 * the mapping's start `map`, file offset moff[i] + file_delta. Pieces up to madvise_max
 * bytes (page aligned) are given back with MADV_REMOVE: up to 1024 of them in ONE call,
 * process_madvise(2) on our own pidfd with an iovec per piece (Linux >= 6.13 takes any advice
 * for the calling process; ~10 % more pages/s than one fallocate per page, 20 % more than one
 * madvise per page, measured by lab/bench/limits.c), else one madvise each. Longer pieces go
 * through fallocate(PUNCH_HOLE | KEEP_SIZE), 2 MiB per call (FALLOC_CHUNK). Each call falls
 * back to the other kind when the kernel says the first cannot punch (EOPNOTSUPP, ENOSYS,
 * EINVAL). A kernel whose process_madvise refuses MADV_REMOVE is remembered and not asked
 * again; any other refusal of a batch (EPERM under a seccomp filter, a sealed file) is left
 * to the single calls that follow, which name it.
 *
 * Returns 0, or the errno that stopped it with *failed = the piece index and *call = 1
 * (madvise) or 2 (fallocate); *done = the bytes punched before that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define PAGE_MASK 4095ULL
#define IOV_BATCH 1024 /* UIO_MAXIOV */
/* Long runs go to fallocate 2 MiB at a time: ~10 % more pages/s than one call for a 1 GiB
 * run (1.59-1.66 M against 1.44-1.49 M pages/s here, a touched memfd mapped twice, as the
 * guest's RAM file is), and the file's locks are let go between chunks, so the guest's
 * faults and other punches on the same file do not wait for the whole run. */
#define FALLOC_CHUNK (2ULL << 20)

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_process_madvise
#define SYS_process_madvise 440
#endif

static int cannot_punch(int e) { return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL; }

/* 0 untried, 1 works, -1 the kernel refuses (no process_madvise, or not MADV_REMOVE) */
static volatile int batch_state;

static int small(uint64_t off, uint64_t length, uint64_t madvise_max) {
    return length <= madvise_max && !((off | length) & PAGE_MASK);
}

/* MADV_REMOVE pieces [i, i + n) in one process_madvise call; returns how many pieces are
 * done (all of them, or those before the one the kernel stopped at: the caller goes on
 * with single calls from there, which name the error). */
static size_t punch_batch(int pidfd, char *map, const uint64_t *moff, const uint64_t *len,
                          size_t i, size_t n, uint64_t *total) {
    struct iovec iov[IOV_BATCH];
    uint64_t want = 0;
    for (size_t k = 0; k < n; k++) {
        iov[k].iov_base = map + moff[i + k];
        iov[k].iov_len = len[i + k];
        want += len[i + k];
    }
    long got = syscall(SYS_process_madvise, pidfd, iov, n, MADV_REMOVE, 0U);
    if (got < 0) {
        if (batch_state == 0 && cannot_punch(errno)) batch_state = -1;
        return 0;
    }
    batch_state = 1;
    if ((uint64_t)got == want) {
        *total += want;
        return n;
    }
    size_t k = 0; /* partial: whole pieces first */
    for (uint64_t left = (uint64_t)got; k < n && len[i + k] <= left; k++) left -= len[i + k];
    for (size_t j = 0; j < k; j++) *total += len[i + j];
    return k; /* a piece cut in the middle is punched again from its start: harmless */
}

/* fallocate(PUNCH_HOLE) of [off, off + length) in calls of at most FALLOC_CHUNK bytes.
 * Returns 0, or -1 with errno; *done = the bytes punched before the failing call. */
static int punch_chunks(int fd, int64_t off, uint64_t length, uint64_t *done) {
    uint64_t at = 0;
    while (at < length) {
        uint64_t n = length - at < FALLOC_CHUNK ? length - at : FALLOC_CHUNK;
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(off + (int64_t)at),
                      (off_t)n) != 0) {
            *done = at;
            return -1;
        }
        at += n;
    }
    *done = length;
    return 0;
}

/* 1 once process_madvise batches have worked, -1 once the kernel refused them, 0 before */
int vb_punch_batching(void) { return batch_state; }

int vb_punch(char *map, int fd, int64_t file_delta, const uint64_t *moff, const uint64_t *len,
             size_t n, uint64_t madvise_max, uint64_t *done, size_t *failed, int *call) {
    uint64_t total = 0;
    int pidfd = -1;
    size_t batched_to = 0; /* pieces before this one were tried in a batch */
    for (size_t i = 0; i < n; i++) {
        uint64_t off = moff[i], length = len[i];
        int e = 0;
        if (i >= batched_to && batch_state >= 0 && small(off, length, madvise_max)) {
            size_t m = 1; /* the run of small pieces from here, up to a batch */
            while (m < IOV_BATCH && i + m < n && small(moff[i + m], len[i + m], madvise_max)) m++;
            batched_to = i + m;
            if (m > 1) {
                if (pidfd < 0) pidfd = (int)syscall(SYS_pidfd_open, getpid(), 0U);
                if (pidfd < 0) {
                    if (batch_state == 0 && cannot_punch(errno)) batch_state = -1;
                } else {
                    size_t k = punch_batch(pidfd, map, moff, len, i, m, &total);
                    if (k == m) {
                        i += m - 1;
                        continue;
                    }
                    i += k; /* single calls from the piece the batch stopped at */
                    if (i >= n) break;
                    off = moff[i], length = len[i];
                }
            }
        }
        if (length <= madvise_max && !((off | length) & PAGE_MASK)) {
            if (madvise(map + off, length, MADV_REMOVE) == 0) {
                total += length;
                continue;
            }
            e = errno;
            if (!cannot_punch(e)) {
                if (pidfd >= 0) close(pidfd);
                *done = total, *failed = i, *call = 1;
                return e;
            }
        }
        uint64_t part = 0;
        if (punch_chunks(fd, (int64_t)off + file_delta, length, &part) != 0) {
            e = errno;
            if (!cannot_punch(e)) {
                if (pidfd >= 0) close(pidfd);
                *done = total + part, *failed = i, *call = 2;
                return e;
            }
            /* the rest through our mapping (part is a whole number of chunks: aligned) */
            if (madvise(map + off + part, length - part, MADV_REMOVE) != 0) {
                e = errno;
                if (pidfd >= 0) close(pidfd);
                *done = total + part, *failed = i, *call = 1;
                return e;
            }
        }
        total += length;
    }
    if (pidfd >= 0) close(pidfd);
    *done = total;
    return 0;
}
