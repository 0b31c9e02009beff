/* A restore's copy out of a slot, checked as it goes: one pass over the source.

   sg_copy_checked copies n bytes from src to dst in chunks. Before each chunk is copied
   its CRC32C is taken from the source (ISA-L's kernel, passed in by the caller), which
   brings the chunk into cache; the copy then reads it from cache and writes the
   destination with streaming stores, which skip reading the destination's lines from
   memory first (a plain store reads each line before it writes it). Memory sees one
   read of the source and one write of the destination, what a large memcpy costs.

   The bytes written are the bytes just checksummed: both come from the same chunk of a
   sealed slot, which nothing writes while a restore holds it.

   Loaded with ctypes (which drops the GIL for the call), so several threads copy parts
   of one block at once; the module object exists only so that setuptools builds and
   installs this file next to the Python sources. Optional: without it (no compiler,
   another CPU) proto/parallel_copy.py copies with memmove and checksums each chunk
   from its destination. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ISA-L's crc32_iscsi: a raw (uninverted) CRC32C state update. */
typedef unsigned (*sg_crc_update)(const unsigned char *buf, int len, unsigned state);

/* Below this a destination is written with plain stores (it stays in cache for what the
   caller does next; streaming stores pay off only on blocks larger than the caches). */
#define SG_STREAM_MIN_BYTES (256u << 10)

/* Memory not yet faulted in (a fresh tensor) is written with plain stores whatever its
   size: the kernel zeroes each new page as the copy first touches it, which leaves the
   page in cache, and plain stores then overwrite it there; streaming stores would
   evict the zeroed lines and write them again. */

static void stream_copy(unsigned char *d, const unsigned char *s, size_t n) {
#if defined(__SSE2__)
    size_t head = (16 - ((uintptr_t)d & 15)) & 15;
    if (head > n)
        head = n;
    memcpy(d, s, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + i, s + i, n - i);
#else
    memcpy(d, s, n);
#endif
}

/* Copy n bytes from src to dst, chunk bytes at a time (chunk < 2 GiB); with update, the
   CRC32C state `state` continued over the source's bytes, each chunk checksummed just
   before it is copied; fresh: dst is memory not yet faulted in. Returns the state
   (unchanged without update). */
unsigned sg_copy_checked(void *dst, const void *src, size_t n, size_t chunk, unsigned state,
                         sg_crc_update update, int fresh) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    int streaming = !fresh && n >= SG_STREAM_MIN_BYTES;
    if (chunk == 0 || chunk > (size_t)INT32_MAX)
        chunk = 1u << 20;
    for (size_t off = 0; off < n; off += chunk) {
        size_t c = n - off < chunk ? n - off : chunk;
        if (update)
            state = update(s + off, (int)c, state);
        if (streaming)
            stream_copy(d + off, s + off, c);
        else
            memcpy(d + off, s + off, c);
    }
#if defined(__SSE2__)
    if (streaming)
        _mm_sfence(); /* the streamed lines are visible before the caller says "done" */
#endif
    return state;
}

static struct PyModuleDef fastcopy_module = {
    PyModuleDef_HEAD_INIT, "_fastcopy",
    "sg_copy_checked, loaded with ctypes (see proto/parallel_copy.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastcopy(void) { return PyModule_Create(&fastcopy_module); }
