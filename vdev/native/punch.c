/* vdev's reclaim loop in C (loaded by vdev/memory.py with ctypes; built by scripts/setup).
 *
 * A scattered batch is hundreds of isolated 4 KiB pages, one kernel call each: this loop
 * makes those calls without a Python round per page, and since ctypes releases the GIL for
 * the whole call, a worker thread punching here leaves the trio thread free.
 *
 * vb_punch punches n pieces of one mapping: piece i is [moff[i], moff[i] + len[i]) bytes from
 * the mapping's start `map`, file offset moff[i] + file_delta. Pieces up to madvise_max
 * bytes (page aligned) go through madvise(MADV_REMOVE), the others through
 * fallocate(PUNCH_HOLE | KEEP_SIZE); each falls back to the other when the kernel says the
 * first cannot punch (EOPNOTSUPP, ENOSYS, EINVAL). Returns 0, or the errno that stopped it
 * with *failed = the piece index and *call = 1 (madvise) or 2 (fallocate); *done = the bytes
 * punched before that.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>

#define PAGE_MASK 4095ULL

static int cannot_punch(int e) { return e == EOPNOTSUPP || e == ENOSYS || e == EINVAL; }

int vb_punch(char *map, int fd, int64_t file_delta, const uint64_t *moff, const uint64_t *len,
             size_t n, uint64_t madvise_max, uint64_t *done, size_t *failed, int *call) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t off = moff[i], length = len[i];
        int e = 0;
        if (length <= madvise_max && !((off | length) & PAGE_MASK)) {
            if (madvise(map + off, length, MADV_REMOVE) == 0) {
                total += length;
                continue;
            }
            e = errno;
            if (!cannot_punch(e)) {
                *done = total, *failed = i, *call = 1;
                return e;
            }
        }
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      (off_t)((int64_t)off + file_delta), (off_t)length) != 0) {
            e = errno;
            if (!cannot_punch(e)) {
                *done = total, *failed = i, *call = 2;
                return e;
            }
            if (madvise(map + off, length, MADV_REMOVE) != 0) {
                *done = total, *failed = i, *call = 1;
                return errno;
            }
        }
        total += length;
    }
    *done = total;
    return 0;
}
