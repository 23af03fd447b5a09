/* reprobuild.images.squashfs._blockpack: one squashfs data block probed and deflated
 * without the GIL, compiled (optional).
 *
 *   bind_probe(path) -> int
 *       load libzstd's functions from the shared object `path` (the pinned zstandard
 *       wheel's own copy of libzstd, see compressors.py) and return its
 *       ZSTD_versionNumber(), which the caller checks against the wheel's version. A
 *       later call keeps the first library and returns its version.
 *   zlib_version() -> str
 *       the version of the libz this module is linked with (the caller checks it is
 *       the one the interpreter's zlib module runs with).
 *   deflate(data, level) -> bytes
 *       zlib.compress(data, level), from this thread's kept deflate stream (data of at
 *       most 1 MiB, squashfs's largest block).
 *   compress_gzip(data, level, probe) -> (stored, size_field)
 *       write.py's compress_block for gzip: when `probe` is true and a zstd level 1
 *       pass cannot shrink the block (first its first 16 KiB, then the whole block, as
 *       Compressor.incompressible does), or when deflate at `level` does not make it
 *       smaller, the block itself and its length with bit 24 set (stored
 *       uncompressed); else the zlib stream of zlib.compress(data, level) and its
 *       length.
 *
 * It is the Python path (Compressor.incompressible, then deflate through ctypes) in one
 * call: the GIL is released once for the whole block, the 16 KiB sample is not copied,
 * and each thread keeps its zstd context, its deflate stream and the probe's output
 * buffer for the next block. tests/images/squashfs/test_blockpack.py checks both give
 * the same bytes and the same verdicts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#define PROBE_SAMPLE 16384
#define UNCOMPRESSED_BIT (1u << 24)
#define MAX_BLOCK (1u << 20) /* squashfs's largest block */

/* libzstd's stable API, declared here: the wheel ships no header. */
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
enum { ZSTD_c_compressionLevel = 100, ZSTD_c_contentSizeFlag = 200 };

static struct {
    unsigned (*versionNumber)(void);
    ZSTD_CCtx *(*createCCtx)(void);
    size_t (*freeCCtx)(ZSTD_CCtx *);
    size_t (*setParameter)(ZSTD_CCtx *, int, int);
    size_t (*compress2)(ZSTD_CCtx *, void *, size_t, const void *, size_t);
    size_t (*compressBound)(size_t);
    unsigned (*isError)(size_t);
} zstd;
static void *zstd_handle;

/* What one thread keeps between blocks. */
typedef struct {
    z_stream stream;
    int level; /* the stream's level; 0 while there is no stream */
    ZSTD_CCtx *probe;
    unsigned char *probe_out;
    size_t probe_capacity;
} Worker;

static pthread_key_t worker_key;
static int worker_key_made;

static void
worker_free(void *pointer)
{
    Worker *worker = pointer;
    if (worker->level)
        deflateEnd(&worker->stream);
    if (worker->probe != NULL)
        zstd.freeCCtx(worker->probe);
    free(worker->probe_out);
    free(worker);
}

/* This thread's worker, made on first use; NULL when out of memory. */
static Worker *
worker_get(void)
{
    Worker *worker = pthread_getspecific(worker_key);
    if (worker != NULL)
        return worker;
    worker = calloc(1, sizeof *worker);
    if (worker == NULL)
        return NULL;
    if (pthread_setspecific(worker_key, worker) != 0) {
        free(worker);
        return NULL;
    }
    return worker;
}

/* The zstd level 1 frame of `data` is shorter than `size`... 1 when it is, 0 when it is
 * not, -1 on a failure (no memory, or a zstd error). Parameters as the Python probe's
 * ZstdCompressor(level=1, write_content_size=True). */
static int
probe_shrinks(Worker *worker, const unsigned char *data, size_t size)
{
    if (worker->probe == NULL) {
        worker->probe = zstd.createCCtx();
        if (worker->probe == NULL)
            return -1;
        if (zstd.isError(zstd.setParameter(worker->probe, ZSTD_c_compressionLevel, 1))
                || zstd.isError(zstd.setParameter(worker->probe, ZSTD_c_contentSizeFlag, 1)))
            return -1;
    }
    size_t capacity = zstd.compressBound(size);
    if (capacity > worker->probe_capacity) {
        unsigned char *grown = realloc(worker->probe_out, capacity);
        if (grown == NULL)
            return -1;
        worker->probe_out = grown;
        worker->probe_capacity = capacity;
    }
    size_t written = zstd.compress2(worker->probe, worker->probe_out, capacity, data, size);
    if (zstd.isError(written))
        return -1;
    return written < size;
}

/* 1 when the probe finds the block incompressible, 0 when not, -1 on a failure. */
static int
incompressible(Worker *worker, const unsigned char *data, size_t size)
{
    if (size > PROBE_SAMPLE) {
        int sample = probe_shrinks(worker, data, PROBE_SAMPLE);
        if (sample != 0)
            return sample < 0 ? -1 : 0;
    }
    int whole = probe_shrinks(worker, data, size);
    return whole < 0 ? -1 : !whole;
}

/* Deflate `data` into `out` (room for `capacity` bytes): the stream's length, 0 when
 * it does not fit, -1 on a zlib failure. Only a stream shorter than the block is kept,
 * so a capacity of one byte less than the block stops deflate early on a block that
 * does not shrink; a stream that fits is the same as with unlimited room. */
static long
deflate_into(Worker *worker, int level, const unsigned char *data, size_t size,
             unsigned char *out, size_t capacity)
{
    if (worker->level != level) {
        if (worker->level) {
            deflateEnd(&worker->stream);
            worker->level = 0;
        }
        memset(&worker->stream, 0, sizeof worker->stream);
        /* zlib.compress's settings: 15-bit window, memLevel 8, default strategy. */
        if (deflateInit2(&worker->stream, level, Z_DEFLATED, 15, 8,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return -1;
        worker->level = level;
    }
    else if (deflateReset(&worker->stream) != Z_OK) {
        return -1;
    }
    worker->stream.next_in = (unsigned char *)data;
    worker->stream.avail_in = (uInt)size;
    worker->stream.next_out = out;
    worker->stream.avail_out = (uInt)capacity;
    int status = deflate(&worker->stream, Z_FINISH);
    if (status == Z_STREAM_END)
        return (long)(capacity - worker->stream.avail_out);
    if (status == Z_OK || status == Z_BUF_ERROR)
        return 0; /* out of room: the stream is not shorter than the block */
    return -1;
}

/* 1 when a block of `size` bytes and `level` are in range; else 0 with a ValueError. */
static int
check_block(Py_ssize_t size, int level)
{
    if ((size_t)size > MAX_BLOCK) {
        PyErr_Format(PyExc_ValueError, "a block of %zd bytes: at most %u bytes expected",
                     size, MAX_BLOCK);
        return 0;
    }
    if (level < 1 || level > 9) {
        PyErr_Format(PyExc_ValueError, "zlib level %d: 1 to 9 expected", level);
        return 0;
    }
    return 1;
}

static PyObject *
stored_raw(PyObject *data, Py_ssize_t size)
{
    return Py_BuildValue("(OI)", data, (unsigned)size | UNCOMPRESSED_BIT);
}

static PyObject *
blockpack_compress_gzip(PyObject *module, PyObject *args)
{
    PyObject *data;
    int level, probe;
    (void)module;
    if (!PyArg_ParseTuple(args, "O!ip:compress_gzip", &PyBytes_Type, &data, &level, &probe))
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (!check_block(size, level))
        return NULL;
    if (probe && zstd.compress2 == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "bind_probe() was not called");
        return NULL;
    }
    if (size <= 1)  /* no stream is shorter than one byte */
        return stored_raw(data, size);
    PyObject *packed = PyBytes_FromStringAndSize(NULL, size - 1);
    if (packed == NULL)
        return NULL;
    const unsigned char *source = (const unsigned char *)PyBytes_AS_STRING(data);
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed);
    int skip = 0;
    long written = 0;
    int failed_in = 0; /* 1: the probe, 2: deflate, 3: memory */
    Py_BEGIN_ALLOW_THREADS
    Worker *worker = worker_get();
    if (worker == NULL) {
        failed_in = 3;
    }
    else {
        if (probe) {
            skip = incompressible(worker, source, (size_t)size);
            if (skip < 0)
                failed_in = 1;
        }
        if (!failed_in && !skip) {
            written = deflate_into(worker, level, source, (size_t)size, out,
                                   (size_t)size - 1);
            if (written < 0)
                failed_in = 2;
        }
    }
    Py_END_ALLOW_THREADS
    if (failed_in) {
        Py_DECREF(packed);
        if (failed_in == 3)
            return PyErr_NoMemory();
        PyErr_SetString(PyExc_RuntimeError, failed_in == 1
                        ? "the zstd probe failed (out of memory?)"
                        : "zlib deflate failed (out of memory?)");
        return NULL;
    }
    if (skip || written == 0) {
        Py_DECREF(packed);
        return stored_raw(data, size);
    }
    if (_PyBytes_Resize(&packed, (Py_ssize_t)written) < 0)
        return NULL;
    return Py_BuildValue("(Nl)", packed, written);
}

static PyObject *
blockpack_deflate(PyObject *module, PyObject *args)
{
    PyObject *data;
    int level;
    (void)module;
    if (!PyArg_ParseTuple(args, "O!i:deflate", &PyBytes_Type, &data, &level))
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (!check_block(size, level))
        return NULL;
    size_t capacity = compressBound((uLong)size);
    PyObject *packed = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)capacity);
    if (packed == NULL)
        return NULL;
    const unsigned char *source = (const unsigned char *)PyBytes_AS_STRING(data);
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed);
    long written = -2;
    Py_BEGIN_ALLOW_THREADS
    Worker *worker = worker_get();
    if (worker != NULL)
        written = deflate_into(worker, level, source, (size_t)size, out, capacity);
    Py_END_ALLOW_THREADS
    if (written <= 0) {  /* a whole stream always fits compressBound */
        Py_DECREF(packed);
        if (written == -2)
            return PyErr_NoMemory();
        PyErr_SetString(PyExc_RuntimeError, "zlib deflate failed (out of memory?)");
        return NULL;
    }
    if (_PyBytes_Resize(&packed, (Py_ssize_t)written) < 0)
        return NULL;
    return packed;
}

static PyObject *
blockpack_bind_probe(PyObject *module, PyObject *arg)
{
    PyObject *encoded;
    (void)module;
    if (!PyUnicode_FSConverter(arg, &encoded))
        return NULL;
    if (zstd_handle != NULL) { /* bound already (under the GIL, so once) */
        Py_DECREF(encoded);
        return PyLong_FromUnsignedLong(zstd.versionNumber());
    }
    void *handle = dlopen(PyBytes_AS_STRING(encoded), RTLD_NOW | RTLD_LOCAL);
    Py_DECREF(encoded);
    if (handle == NULL) {
        PyErr_Format(PyExc_OSError, "%s", dlerror());
        return NULL;
    }
    struct { const char *name; void **slot; } symbols[] = {
        {"ZSTD_versionNumber", (void **)&zstd.versionNumber},
        {"ZSTD_createCCtx", (void **)&zstd.createCCtx},
        {"ZSTD_freeCCtx", (void **)&zstd.freeCCtx},
        {"ZSTD_CCtx_setParameter", (void **)&zstd.setParameter},
        {"ZSTD_compress2", (void **)&zstd.compress2},
        {"ZSTD_compressBound", (void **)&zstd.compressBound},
        {"ZSTD_isError", (void **)&zstd.isError},
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        void *found = dlsym(handle, symbols[i].name);
        if (found == NULL) {
            PyErr_Format(PyExc_OSError, "%s is not in the library", symbols[i].name);
            memset(&zstd, 0, sizeof zstd);
            dlclose(handle);
            return NULL;
        }
        memcpy(symbols[i].slot, &found, sizeof found);
    }
    zstd_handle = handle; /* kept open: thread exits free contexts through it */
    return PyLong_FromUnsignedLong(zstd.versionNumber());
}

static PyObject *
blockpack_zlib_version(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyUnicode_FromString(zlibVersion());
}

static PyMethodDef blockpack_methods[] = {
    {"bind_probe", blockpack_bind_probe, METH_O,
     "bind_probe(path) -> int: load libzstd from `path`; its version number"},
    {"zlib_version", blockpack_zlib_version, METH_NOARGS,
     "zlib_version() -> str: the linked libz's version"},
    {"deflate", blockpack_deflate, METH_VARARGS,
     "deflate(data, level) -> bytes: zlib.compress(data, level)"},
    {"compress_gzip", blockpack_compress_gzip, METH_VARARGS,
     "compress_gzip(data, level, probe) -> (stored, size_field): one data block as"
     " squashfs stores it with gzip"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef blockpack_module = {
    PyModuleDef_HEAD_INIT, "_blockpack",
    "One squashfs block probed and deflated without the GIL, compiled (optional; see"
    " compressors.py).", -1,
    blockpack_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__blockpack(void)
{
    if (!worker_key_made) {
        if (pthread_key_create(&worker_key, worker_free) != 0) {
            PyErr_SetString(PyExc_OSError, "pthread_key_create failed");
            return NULL;
        }
        worker_key_made = 1;
    }
    return PyModule_Create(&blockpack_module);
}
