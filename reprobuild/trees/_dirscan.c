/* reprobuild.trees._dirscan: one directory's sorted names and their lstat, compiled
 * (optional).
 *
 *   scan(path) -> [(name, stat), ...]
 *       every name in the directory `path` (bytes) but "." and "..", in bytewise order
 *       (Python's sorted() of the names as bytes), each with its lstat: a struct
 *       sequence `stat` holding the os.stat_result fields the directory walk reads
 *       (st_mode, st_ino, st_dev, st_nlink, st_uid, st_gid, st_size, st_rdev,
 *       st_mtime_ns), with the same values.
 *
 * It is directory.py's _scan_python (os.listdir, sorted, os.lstat relative to the
 * directory's descriptor) in one call: the names are read and stat'ed without the GIL
 * and without making an os.stat_result of some twenty fields for each, which is half
 * of what a walk of a tree of small files costs in Python. An error is the OSError the
 * Python path raises (the errno of the failed call, the path it failed on).
 * tests/trees/test_dirscan.py checks both give the same listings and the same trees.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structseq.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static PyTypeObject *StatType;

static PyStructSequence_Field stat_fields[] = {
    {"st_mode", "file type and permission bits"},
    {"st_ino", "inode number"},
    {"st_dev", "device"},
    {"st_nlink", "number of hard links"},
    {"st_uid", "owner"},
    {"st_gid", "group"},
    {"st_size", "size in bytes"},
    {"st_rdev", "device type, for a device"},
    {"st_mtime_ns", "modification time in nanoseconds"},
    {NULL, NULL},
};

static PyStructSequence_Desc stat_desc = {
    "reprobuild.trees._dirscan.stat",
    "The lstat fields of one directory entry that the directory walk reads.",
    stat_fields, 9,
};

/* The names, one arena of NUL-terminated strings, and each one's lstat. */
typedef struct {
    char *arena;
    size_t arena_used, arena_size;
    size_t *offsets, *lengths;
    struct stat *stats;
    size_t count, capacity;
} Listing;

static void
listing_free(Listing *l)
{
    free(l->arena);
    free(l->offsets);
    free(l->lengths);
    free(l->stats);
}

/* 0, or an errno value (ENOMEM). */
static int
listing_add(Listing *l, const char *name, size_t length)
{
    if (l->count == l->capacity) {
        size_t capacity = l->capacity ? l->capacity * 2 : 64;
        size_t *offsets = realloc(l->offsets, capacity * sizeof(size_t));
        if (offsets == NULL)
            return ENOMEM;
        l->offsets = offsets;
        size_t *lengths = realloc(l->lengths, capacity * sizeof(size_t));
        if (lengths == NULL)
            return ENOMEM;
        l->lengths = lengths;
        l->capacity = capacity;
    }
    if (l->arena_used + length + 1 > l->arena_size) {
        size_t size = l->arena_size ? l->arena_size : 4096;
        while (l->arena_used + length + 1 > size)
            size *= 2;
        char *arena = realloc(l->arena, size);
        if (arena == NULL)
            return ENOMEM;
        l->arena = arena;
        l->arena_size = size;
    }
    memcpy(l->arena + l->arena_used, name, length + 1);
    l->offsets[l->count] = l->arena_used;
    l->lengths[l->count] = length;
    l->arena_used += length + 1;
    l->count++;
    return 0;
}

/* A name to sort: where it is in the arena, and its length. */
typedef struct {
    const char *name;
    size_t length;
} Name;

static int
compare_names(const void *a, const void *b)
{
    const Name *x = a, *y = b;
    size_t common = x->length < y->length ? x->length : y->length;
    int order = memcmp(x->name, y->name, common);
    if (order != 0)
        return order;
    return (x->length > y->length) - (x->length < y->length);
}

/* Read, sort and lstat the directory open as `fd` (closed here). 0 or an errno
 * value; *failed_at is the index of the name whose lstat failed, or -1. */
static int
read_listing(int fd, Listing *l, Name **sorted_out, Py_ssize_t *failed_at)
{
    *failed_at = -1;
    DIR *dir = fdopendir(fd);
    if (dir == NULL) {
        int error = errno;
        close(fd);
        return error;
    }
    int error = 0;
    for (;;) {
        errno = 0;
        struct dirent *entry = readdir(dir);
        if (entry == NULL) {
            error = errno;
            break;
        }
        const char *name = entry->d_name;
        if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
            continue;
        error = listing_add(l, name, strlen(name));
        if (error)
            break;
    }
    Name *sorted = NULL;
    if (!error && l->count) {
        sorted = malloc(l->count * sizeof(Name));
        l->stats = malloc(l->count * sizeof(struct stat));
        if (sorted == NULL || l->stats == NULL)
            error = ENOMEM;
    }
    if (!error) {
        for (size_t i = 0; i < l->count; i++) {
            sorted[i].name = l->arena + l->offsets[i];
            sorted[i].length = l->lengths[i];
        }
        if (l->count > 1)
            qsort(sorted, l->count, sizeof(Name), compare_names);
        int dfd = dirfd(dir);
        for (size_t i = 0; i < l->count; i++) {
            if (fstatat(dfd, sorted[i].name, &l->stats[i], AT_SYMLINK_NOFOLLOW) != 0) {
                error = errno;
                *failed_at = (Py_ssize_t)i;
                break;
            }
        }
    }
    closedir(dir);
    *sorted_out = sorted;
    return error;
}

/* seconds * 10**9 + nanoseconds, as os.stat_result's st_mtime_ns (any size). */
static PyObject *
nanoseconds(long long seconds, long nanos)
{
    if (seconds > -9000000000LL && seconds < 9000000000LL)
        return PyLong_FromLongLong(seconds * 1000000000LL + nanos);
    PyObject *s = PyLong_FromLongLong(seconds);
    PyObject *billion = PyLong_FromLong(1000000000L);
    PyObject *n = PyLong_FromLong(nanos);
    PyObject *scaled = s && billion ? PyNumber_Multiply(s, billion) : NULL;
    PyObject *result = scaled && n ? PyNumber_Add(scaled, n) : NULL;
    Py_XDECREF(s);
    Py_XDECREF(billion);
    Py_XDECREF(n);
    Py_XDECREF(scaled);
    return result;
}

static PyObject *
make_stat(const struct stat *st)
{
    PyObject *result = PyStructSequence_New(StatType);
    if (result == NULL)
        return NULL;
    PyObject *values[9] = {
        PyLong_FromUnsignedLong(st->st_mode),
        PyLong_FromUnsignedLongLong(st->st_ino),
        PyLong_FromUnsignedLongLong(st->st_dev),
        PyLong_FromUnsignedLongLong(st->st_nlink),
        PyLong_FromUnsignedLong(st->st_uid),
        PyLong_FromUnsignedLong(st->st_gid),
        PyLong_FromLongLong(st->st_size),
        PyLong_FromUnsignedLongLong(st->st_rdev),
        nanoseconds((long long)st->st_mtim.tv_sec, st->st_mtim.tv_nsec),
    };
    int ok = 1;
    for (int i = 0; i < 9; i++) {
        if (values[i] == NULL)
            ok = 0;
        PyStructSequence_SET_ITEM(result, i, values[i]);  /* NULL stays NULL: freed */
    }
    if (!ok) {
        Py_DECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *
dirscan_scan(PyObject *Py_UNUSED(module), PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "scan() takes the directory's path as bytes");
        return NULL;
    }
    const char *path = PyBytes_AS_STRING(arg);
    if (strlen(path) != (size_t)PyBytes_GET_SIZE(arg)) {
        PyErr_SetString(PyExc_ValueError, "scan(): embedded null byte");
        return NULL;
    }
    Listing listing = {0};
    Name *sorted = NULL;
    Py_ssize_t failed_at = -1;
    int error;
    Py_BEGIN_ALLOW_THREADS
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        error = errno;
    else
        error = read_listing(fd, &listing, &sorted, &failed_at);
    Py_END_ALLOW_THREADS
    PyObject *result = NULL;
    if (error) {
        if (error == ENOMEM) {
            PyErr_NoMemory();
        } else {
            errno = error;
            PyObject *where = failed_at < 0 ? (Py_INCREF(arg), arg)
                : PyBytes_FromStringAndSize(sorted[failed_at].name,
                                            (Py_ssize_t)sorted[failed_at].length);
            if (where != NULL) {
                PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, where);
                Py_DECREF(where);
            }
        }
        goto done;
    }
    result = PyList_New((Py_ssize_t)listing.count);
    if (result == NULL)
        goto done;
    for (size_t i = 0; i < listing.count; i++) {
        PyObject *name = PyBytes_FromStringAndSize(sorted[i].name,
                                                   (Py_ssize_t)sorted[i].length);
        PyObject *st = name == NULL ? NULL : make_stat(&listing.stats[i]);
        PyObject *pair = st == NULL ? NULL : PyTuple_Pack(2, name, st);
        Py_XDECREF(name);
        Py_XDECREF(st);
        if (pair == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, (Py_ssize_t)i, pair);
    }
done:
    free(sorted);
    listing_free(&listing);
    return result;
}

static PyMethodDef dirscan_methods[] = {
    {"scan", dirscan_scan, METH_O,
     "scan(path) -> [(name, stat), ...]: the directory's names in bytewise order, each"
     " with its lstat"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef dirscan_module = {
    PyModuleDef_HEAD_INIT, "_dirscan",
    "One directory's sorted names and their lstat, compiled (optional; see"
    " directory.py).", -1,
    dirscan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__dirscan(void)
{
    PyObject *module = PyModule_Create(&dirscan_module);
    if (module == NULL)
        return NULL;
    if (StatType == NULL) {
        StatType = PyStructSequence_NewType(&stat_desc);
        if (StatType == NULL) {
            Py_DECREF(module);
            return NULL;
        }
    }
    Py_INCREF(StatType);
    if (PyModule_AddObject(module, "stat", (PyObject *)StatType) < 0) {
        Py_DECREF(StatType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
