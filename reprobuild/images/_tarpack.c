/* reprobuild.images._tarpack: the tar writer's per-member hot loops, compiled.
 *
 * Optional: reprobuild/native.py loads it when it was built (setup.py, by
 * scripts/setup.sh) and the pure Python code in tar.py does the same work otherwise.
 * Both give the same bytes; tests/images/test_tarpack.py checks it.
 *
 *   ustar(name, linkname, typeflag, mode, uid, gid, size, mtime, devmajor, devminor)
 *       -> the 512-byte POSIX ustar header with its checksum, as tar.HeaderMaker.make
 *          makes it (numeric owners only, no prefix field).
 *   plan_common(entries, start, clamp_ns, REGULAR, DIRECTORY, first_of, TarMember,
 *               members)
 *       -> tar.plan's inline loop: from entries[start] on, each common entry (a file or
 *          directory with no xattrs, not in a hardlink group, a short ASCII name and
 *          values that fit the ustar fields) appended to members as its TarMember;
 *          returns the index of the first other entry (len(entries) at the end), which
 *          the Python code plans.
 *   append_members(buffer, fill, members, start, limit, small_file, FileSource)
 *       -> (index, fill, changed): tar._write's loop for headers and small files on
 *          disk: from members[start] on, each member's header and, for a file of at most
 *          small_file bytes whose source is a FileSource, its bytes and padding (read
 *          through its directory's descriptor, kept open while the files of one
 *          directory follow each other), put in the bytearray from offset fill on (it
 *          grows as needed, never shrinks), until fill reaches limit. Stops
 *          before a member with other content (index: Python writes it) and after a
 *          file whose size was not the planned one (changed: the bytes read; else -1).
 *
 * Every value is checked before it is written: a field that does not fit raises
 * ValueError (the caller only passes values that fit), a failed system call raises
 * OSError naming the file. The GIL is released only around open/read/close, while the
 * buffer's export keeps the bytearray from being resized.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define BLOCK 512
#define NAME_MAX_FIELD 100
#define CHKSUM_OFFSET 148

/* struct posix_header (POSIX pax/ustar; GNU tar src/tar.h) field offsets. */
#define OFF_NAME 0
#define OFF_MODE 100
#define OFF_UID 108
#define OFF_GID 116
#define OFF_SIZE 124
#define OFF_MTIME 136
#define OFF_TYPEFLAG 156
#define OFF_LINKNAME 157
#define OFF_MAGIC 257
#define OFF_DEVMAJOR 329
#define OFF_DEVMINOR 337

/* Writes value as width - 1 zero-padded octal digits and a NUL ("%0*o\0"); 0 when the
 * value does not fit in them (negative, or 8 ** (width - 1) or more). */
static int
put_octal(unsigned char *field, int width, long long value)
{
    int digits = width - 1;
    if (value < 0 || (digits < 21 && (value >> (3 * digits)) != 0)) {
        return 0;
    }
    unsigned long long rest = (unsigned long long)value;
    for (int i = digits - 1; i >= 0; i--) {
        field[i] = (unsigned char)('0' + (rest & 7));
        rest >>= 3;
    }
    field[digits] = '\0';
    return 1;
}

static int
put_number(unsigned char *header, int offset, int width, PyObject *number,
           const char *what)
{
    long long value = PyLong_AsLongLong(number);
    if (value == -1 && PyErr_Occurred()) {
        return 0;
    }
    if (!put_octal(header + offset, width, value)) {
        PyErr_Format(PyExc_ValueError, "tar header: %s %lld does not fit in %d octal digits",
                     what, value, width - 1);
        return 0;
    }
    return 1;
}

/* Copies at most NAME_MAX_FIELD bytes of a bytes object (the caller cuts long names). */
static int
put_name(unsigned char *header, int offset, PyObject *text, const char *what)
{
    if (!PyBytes_Check(text)) {
        PyErr_Format(PyExc_TypeError, "tar header: %s must be bytes", what);
        return 0;
    }
    Py_ssize_t length = PyBytes_GET_SIZE(text);
    if (length > NAME_MAX_FIELD) {
        length = NAME_MAX_FIELD;
    }
    memcpy(header + offset, PyBytes_AS_STRING(text), (size_t)length);
    return 1;
}

/* The magic, version, type flag and checksum of a header whose other fields are set. */
static void
finish_header(unsigned char *header, unsigned char typeflag)
{
    header[OFF_TYPEFLAG] = typeflag;
    memcpy(header + OFF_MAGIC, "ustar\0" "00", 8);
    memset(header + CHKSUM_OFFSET, ' ', 8);
    unsigned long checksum = 0;
    for (int i = 0; i < BLOCK; i++) {
        checksum += header[i];
    }
    /* "%06o\0 ": at most 512 * 255 = 130560 = 0377000, six digits. */
    put_octal(header + CHKSUM_OFFSET, 7, (long long)checksum);
    header[CHKSUM_OFFSET + 7] = ' ';
}

static PyObject *
tarpack_ustar(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "ustar() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *typeflag = args[2];
    if (!PyBytes_Check(typeflag) || PyBytes_GET_SIZE(typeflag) != 1) {
        PyErr_SetString(PyExc_TypeError, "ustar(): typeflag must be one byte");
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, BLOCK);
    if (result == NULL) {
        return NULL;
    }
    unsigned char *header = (unsigned char *)PyBytes_AS_STRING(result);
    memset(header, 0, BLOCK);
    if (!put_name(header, OFF_NAME, args[0], "name")
        || !put_name(header, OFF_LINKNAME, args[1], "linkname")
        || !put_number(header, OFF_MODE, 8, args[3], "mode")
        || !put_number(header, OFF_UID, 8, args[4], "uid")
        || !put_number(header, OFF_GID, 8, args[5], "gid")
        || !put_number(header, OFF_SIZE, 12, args[6], "size")
        || !put_number(header, OFF_MTIME, 12, args[7], "mtime")
        || !put_number(header, OFF_DEVMAJOR, 8, args[8], "devmajor")
        || !put_number(header, OFF_DEVMINOR, 8, args[9], "devminor")) {
        Py_DECREF(result);
        return NULL;
    }
    finish_header(header, (unsigned char)PyBytes_AS_STRING(typeflag)[0]);
    return result;
}

/* PyUnicode names of the Entry and Content slots plan_common reads. */
static PyObject *attr_path, *attr_type, *attr_xattrs, *attr_content, *attr_mtime_ns,
    *attr_uid, *attr_gid, *attr_mode, *attr_size, *attr_source;

/* A plain int attribute in [0, limit]; 0 (no exception) when it is not one. */
static int
small_attr(PyObject *object, PyObject *name, long long limit, long long *value)
{
    PyObject *number = PyObject_GetAttr(object, name);
    if (number == NULL) {
        return -1;
    }
    int overflow = 0;
    *value = PyLong_Check(number) ? PyLong_AsLongLongAndOverflow(number, &overflow) : -1;
    Py_DECREF(number);
    if (*value == -1 && PyErr_Occurred()) {
        return -1;
    }
    return !overflow && *value >= 0 && *value <= limit;
}

#define MAX_ID 07777777LL
#define MAX_OCTAL11 077777777777LL

/* The TarMember of a common entry (see plan_common), 0 when the entry is not one, -1
 * on failure. */
static int
plan_one(PyObject *entry, PyObject *regular, PyObject *directory, long long clamp_ns,
         PyObject *first_of, PyObject *member_type, PyObject *members)
{
    int result = 0;
    PyObject *path = NULL, *kind = NULL, *xattrs = NULL, *content = NULL, *header = NULL;
    long long mode, uid, gid, size = 0, mtime_ns;
    if ((path = PyObject_GetAttr(entry, attr_path)) == NULL
        || (kind = PyObject_GetAttr(entry, attr_type)) == NULL
        || (xattrs = PyObject_GetAttr(entry, attr_xattrs)) == NULL) {
        result = -1;
        goto done;
    }
    if ((kind != regular && kind != directory) || !PyBytes_Check(path)
        || !PyTuple_Check(xattrs) || PyTuple_GET_SIZE(xattrs) != 0) {
        goto done;
    }
    if (PyDict_GET_SIZE(first_of) != 0) {
        int linked = PyDict_Contains(first_of, path);
        if (linked != 0) {
            result = linked < 0 ? -1 : 0;
            goto done;
        }
    }
    int fits;
    if ((fits = small_attr(entry, attr_mode, LLONG_MAX, &mode)) != 1
        || (fits = small_attr(entry, attr_uid, MAX_ID, &uid)) != 1
        || (fits = small_attr(entry, attr_gid, MAX_ID, &gid)) != 1
        || (fits = small_attr(entry, attr_mtime_ns, LLONG_MAX, &mtime_ns)) != 1) {
        result = fits < 0 ? -1 : 0;
        goto done;
    }
    if (mtime_ns > clamp_ns) {
        mtime_ns = clamp_ns;
    }
    long long seconds = mtime_ns / 1000000000LL;
    if (mtime_ns % 1000000000LL != 0 || seconds < 0 || seconds > MAX_OCTAL11) {
        goto done;
    }
    if (kind == regular) {
        if ((content = PyObject_GetAttr(entry, attr_content)) == NULL) {
            result = -1;
            goto done;
        }
        if (content != Py_None
            && (fits = small_attr(content, attr_size, MAX_OCTAL11, &size)) != 1) {
            result = fits < 0 ? -1 : 0;
            goto done;
        }
    }
    /* The member name: "./" + path, and "/" after a directory's (the root is "./"). */
    Py_ssize_t path_length = PyBytes_GET_SIZE(path);
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(path);
    int slash = kind == directory && path_length > 0;
    if (path_length + 2 + slash > NAME_MAX_FIELD) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < path_length; i++) {
        if (raw[i] >= 0x80) {
            goto done; /* a pax path record */
        }
    }
    if ((header = PyBytes_FromStringAndSize(NULL, BLOCK)) == NULL) {
        result = -1;
        goto done;
    }
    unsigned char *block = (unsigned char *)PyBytes_AS_STRING(header);
    memset(block, 0, BLOCK);
    block[OFF_NAME] = '.';
    block[OFF_NAME + 1] = '/';
    memcpy(block + OFF_NAME + 2, raw, (size_t)path_length);
    if (slash) {
        block[OFF_NAME + 2 + path_length] = '/';
    }
    put_octal(block + OFF_MODE, 8, mode & 07777);
    put_octal(block + OFF_UID, 8, uid);
    put_octal(block + OFF_GID, 8, gid);
    put_octal(block + OFF_SIZE, 12, size);
    put_octal(block + OFF_MTIME, 12, seconds);
    put_octal(block + OFF_DEVMAJOR, 8, 0);
    put_octal(block + OFF_DEVMINOR, 8, 0);
    finish_header(block, kind == regular ? '0' : '5');
    /* TarMember(header, content, path), made as tuple.__new__ makes a tuple subclass's
     * instance (the named tuple's Python __new__ costs more than the rest). */
    PyObject *member = ((PyTypeObject *)member_type)->tp_alloc((PyTypeObject *)member_type, 3);
    if (member == NULL) {
        result = -1;
        goto done;
    }
    PyObject *data = kind == regular ? content : Py_None;
    Py_INCREF(header);
    Py_INCREF(data);
    Py_INCREF(path);
    PyTuple_SET_ITEM(member, 0, header);
    PyTuple_SET_ITEM(member, 1, data);
    PyTuple_SET_ITEM(member, 2, path);
    int appended = PyList_Append(members, member);
    Py_DECREF(member);
    if (appended < 0) {
        result = -1;
        goto done;
    }
    result = 1;
done:
    Py_XDECREF(path);
    Py_XDECREF(kind);
    Py_XDECREF(xattrs);
    Py_XDECREF(content);
    Py_XDECREF(header);
    return result;
}

static PyObject *
tarpack_plan_common(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "plan_common() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *entries = args[0], *regular = args[3], *directory = args[4];
    PyObject *first_of = args[5], *member_type = args[6], *members = args[7];
    if (!PyList_CheckExact(entries) || !PyDict_Check(first_of) || !PyList_Check(members)) {
        PyErr_SetString(PyExc_TypeError,
                        "plan_common(): entries and members must be lists, first_of a dict");
        return NULL;
    }
    /* A named tuple: a tuple subclass whose instances have no __dict__. */
    if (!PyType_Check(member_type)
        || !PyType_IsSubtype((PyTypeObject *)member_type, &PyTuple_Type)
        || ((PyTypeObject *)member_type)->tp_dictoffset != 0) {
        PyErr_SetString(PyExc_TypeError, "plan_common(): TarMember must be a named tuple");
        return NULL;
    }
    Py_ssize_t index = PyLong_AsSsize_t(args[1]);
    long long clamp_ns = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (index < 0) {
        PyErr_SetString(PyExc_ValueError, "plan_common(): negative start");
        return NULL;
    }
    for (; index < PyList_GET_SIZE(entries); index++) {
        PyObject *entry = PyList_GET_ITEM(entries, index);
        Py_INCREF(entry);
        int planned = plan_one(entry, regular, directory, clamp_ns, first_of, member_type,
                               members);
        Py_DECREF(entry);
        if (planned < 0) {
            return NULL;
        }
        if (planned == 0) {
            break;
        }
    }
    return PyLong_FromSsize_t(index);
}

/* Opens name (relative to dirfd) and reads up to want bytes of it into out, until EOF;
 * the count, or -1 with errno set. Called without the GIL, once per file: an
 * interrupted call is retried here (a regular file's read is short), and *interrupted
 * tells the caller to run the signal handlers once it holds the GIL again. */
static Py_ssize_t
read_file_at(int dirfd, const char *name, char *out, Py_ssize_t want, int *interrupted)
{
    int fd;
    while ((fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC)) < 0) {
        if (errno != EINTR) {
            return -1;
        }
        *interrupted = 1;
    }
    Py_ssize_t got = 0;
    while (got < want) {
        ssize_t n = read(fd, out + got, (size_t)(want - got));
        if (n < 0 && errno == EINTR) {
            *interrupted = 1;
            continue;
        }
        if (n < 0) {
            int saved_errno = errno;
            close(fd);
            errno = saved_errno;
            return -1;
        }
        if (n == 0) {
            break;
        }
        got += n;
    }
    close(fd); /* read-only: nothing to lose on a failed close */
    return got;
}

/* Makes the bytearray buffer hold at least `length` bytes (it only ever grows: a buffer
 * that shrank would be given back to the allocator and faulted in again). */
static int
reserve(PyObject *buffer, Py_ssize_t length)
{
    return PyByteArray_GET_SIZE(buffer) >= length ? 0 : PyByteArray_Resize(buffer, length);
}

/* Puts the bytes of the file `name` (relative to dirfd, or AT_FDCWD) and their padding
 * into the bytearray buffer at *fill, which it moves past them; how many were read (at
 * most size + 1), or -1 with OSError naming `path` (*fill unchanged). */
static Py_ssize_t
read_at(PyObject *buffer, Py_ssize_t *fill, int dirfd, const char *name, PyObject *path,
        Py_ssize_t size)
{
    if (size < 0 || size > PY_SSIZE_T_MAX - 2 * BLOCK
        || *fill > PY_SSIZE_T_MAX - 2 * BLOCK - size) {
        PyErr_SetString(PyExc_ValueError, "append_members(): size out of range");
        return -1;
    }
    Py_ssize_t want = size + 1; /* one more: a file that grew shows it */
    if (reserve(buffer, *fill + want + BLOCK) < 0) {
        return -1;
    }
    Py_buffer view; /* the export keeps the bytearray from moving while we read */
    if (PyObject_GetBuffer(buffer, &view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0) {
        return -1;
    }
    char *out = (char *)view.buf + *fill;
    int saved_errno = 0, interrupted = 0;
    Py_ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    got = read_file_at(dirfd, name, out, want, &interrupted);
    saved_errno = errno;
    Py_END_ALLOW_THREADS
    /* Signal handlers run while the export still stops them from resizing the buffer. */
    int failed = got < 0 || (interrupted && PyErr_CheckSignals() < 0);
    /* The bytes read, then zeros to the next block (got <= size + 1 < want + BLOCK). */
    Py_ssize_t padding = failed ? 0 : (BLOCK - got % BLOCK) % BLOCK;
    memset(out + (failed ? 0 : got), 0, (size_t)padding);
    PyBuffer_Release(&view);
    if (failed) {
        if (!PyErr_Occurred()) {
            errno = saved_errno;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        }
        return -1;
    }
    *fill += got + padding;
    return got;
}

static int
checked_path(PyObject *path)
{
    if (!PyBytes_Check(path)) {
        PyErr_SetString(PyExc_TypeError, "append_members(): a FileSource path must be bytes");
        return 0;
    }
    if ((Py_ssize_t)strlen(PyBytes_AS_STRING(path)) != PyBytes_GET_SIZE(path)) {
        PyErr_SetString(PyExc_ValueError, "append_members(): embedded null byte in a path");
        return 0;
    }
    return 1;
}

/* The directory of the last file opened by append_members, kept open (O_PATH) so that
 * each file of it is opened by its name alone: no walk of the whole path each time. */
struct open_directory {
    PyObject *path; /* bytes, NULL when none is open */
    int fd;
};

static void
close_directory(struct open_directory *directory)
{
    if (directory->path != NULL) {
        close(directory->fd);
        Py_CLEAR(directory->path);
    }
}

/* The descriptor of the directory part (slash bytes) of path, opened if it is not the
 * one open already; -1 with OSError naming path. */
static int
directory_fd(struct open_directory *directory, PyObject *path, Py_ssize_t slash)
{
    const char *raw = PyBytes_AS_STRING(path);
    Py_ssize_t length = slash == 0 ? 1 : slash; /* "/name": the root */
    if (directory->path != NULL && PyBytes_GET_SIZE(directory->path) == length
        && memcmp(PyBytes_AS_STRING(directory->path), raw, (size_t)length) == 0) {
        return directory->fd;
    }
    close_directory(directory);
    PyObject *name = PyBytes_FromStringAndSize(raw, length); /* NUL-terminated */
    if (name == NULL) {
        return -1;
    }
    int fd, saved_errno;
    do {
        Py_BEGIN_ALLOW_THREADS
        fd = open(PyBytes_AS_STRING(name), O_PATH | O_DIRECTORY | O_CLOEXEC);
        saved_errno = errno;
        Py_END_ALLOW_THREADS
    } while (fd < 0 && saved_errno == EINTR && PyErr_CheckSignals() == 0);
    if (fd < 0) {
        Py_DECREF(name);
        if (!PyErr_Occurred()) {
            errno = saved_errno;
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        }
        return -1;
    }
    directory->path = name;
    directory->fd = fd;
    return fd;
}

/* What append_members does with one member: 1 taken, 0 left to Python, -1 failed; a
 * file that did not have its planned size stops the run with *changed = bytes read. */
static int
append_member(PyObject *buffer, Py_ssize_t *fill, PyObject *member, Py_ssize_t small_file,
              PyObject *file_source, struct open_directory *directory, Py_ssize_t *changed)
{
    if (!PyTuple_Check(member) || PyTuple_GET_SIZE(member) < 2
        || !PyBytes_Check(PyTuple_GET_ITEM(member, 0))) {
        return 0;
    }
    PyObject *header = PyTuple_GET_ITEM(member, 0), *content = PyTuple_GET_ITEM(member, 1);
    PyObject *source = NULL, *path = NULL;
    long long size = 0;
    int result = 0;
    if (content != Py_None) {
        int fits = small_attr(content, attr_size, small_file, &size);
        if (fits != 1) {
            return fits;
        }
        if ((source = PyObject_GetAttr(content, attr_source)) == NULL) {
            return -1;
        }
        if ((PyObject *)Py_TYPE(source) != file_source) {
            goto done;
        }
        if ((path = PyObject_GetAttr(source, attr_path)) == NULL) {
            result = -1;
            goto done;
        }
        if (!checked_path(path)) {
            result = -1;
            goto done;
        }
    }
    Py_ssize_t start = *fill, length = PyBytes_GET_SIZE(header);
    if (length > PY_SSIZE_T_MAX - start || reserve(buffer, start + length) < 0) {
        result = -1;
        goto done;
    }
    memcpy(PyByteArray_AS_STRING(buffer) + start, PyBytes_AS_STRING(header), (size_t)length);
    *fill = start + length;
    result = 1;
    if (path != NULL) {
        const char *raw = PyBytes_AS_STRING(path), *slash = strrchr(raw, '/');
        int dirfd = slash == NULL ? AT_FDCWD : directory_fd(directory, path, slash - raw);
        Py_ssize_t got = dirfd == -1 ? -1 : read_at(buffer, fill, dirfd,
                                                    slash == NULL ? raw : slash + 1, path,
                                                    (Py_ssize_t)size);
        if (got < 0) {
            *fill = start; /* the member is Python's to report */
            result = -1;
        } else if (got != size) {
            *changed = got;
        }
    }
done:
    Py_XDECREF(source);
    Py_XDECREF(path);
    return result;
}

static PyObject *
tarpack_append_members(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "append_members() takes 7 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *buffer = args[0], *members = args[2], *file_source = args[6];
    if (!PyByteArray_CheckExact(buffer) || !PyList_CheckExact(members)) {
        PyErr_SetString(PyExc_TypeError,
                        "append_members(): buffer must be a bytearray, members a list");
        return NULL;
    }
    Py_ssize_t fill = PyLong_AsSsize_t(args[1]);
    Py_ssize_t index = PyLong_AsSsize_t(args[3]);
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    Py_ssize_t small_file = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (index < 0 || small_file < 0 || fill < 0 || fill > PyByteArray_GET_SIZE(buffer)) {
        PyErr_SetString(PyExc_ValueError,
                        "append_members(): negative start or size, or fill past the buffer");
        return NULL;
    }
    struct open_directory directory = {NULL, -1};
    Py_ssize_t changed = -1;
    for (; index < PyList_GET_SIZE(members) && fill < limit; index++) {
        PyObject *member = PyList_GET_ITEM(members, index);
        Py_INCREF(member);
        int taken = append_member(buffer, &fill, member, small_file, file_source, &directory,
                                  &changed);
        Py_DECREF(member);
        if (taken < 0) {
            close_directory(&directory);
            return NULL;
        }
        if (taken == 0 || changed >= 0) {
            break;
        }
    }
    close_directory(&directory);
    return Py_BuildValue("(nnn)", index, fill, changed);
}

static PyMethodDef tarpack_methods[] = {
    {"ustar", (PyCFunction)(void (*)(void))tarpack_ustar, METH_FASTCALL,
     "ustar(name, linkname, typeflag, mode, uid, gid, size, mtime, devmajor, devminor)"
     " -> the 512-byte ustar header with its checksum"},
    {"append_members", (PyCFunction)(void (*)(void))tarpack_append_members, METH_FASTCALL,
     "append_members(buffer, fill, members, start, limit, small_file, FileSource) ->"
     " (index, fill, changed): the members from start on put in the buffer at fill,"
     " until fill reaches limit or a member is left to Python (see the module comment)"},
    {"plan_common", (PyCFunction)(void (*)(void))tarpack_plan_common, METH_FASTCALL,
     "plan_common(entries, start, clamp_ns, REGULAR, DIRECTORY, first_of, TarMember,"
     " members) -> the index of the first entry not planned; the common members from"
     " start on appended to members"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tarpack_module = {
    PyModuleDef_HEAD_INIT, "_tarpack",
    "The tar writer's per-member hot loops, compiled (optional; see tar.py).", -1,
    tarpack_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tarpack(void)
{
    static PyObject **const names[] = {&attr_path, &attr_type, &attr_xattrs, &attr_content,
                                       &attr_mtime_ns, &attr_uid, &attr_gid, &attr_mode,
                                       &attr_size, &attr_source};
    static const char *const texts[] = {"path", "type", "xattrs", "content", "mtime_ns",
                                        "uid", "gid", "mode", "size", "source"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (*names[i] == NULL && (*names[i] = PyUnicode_InternFromString(texts[i])) == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&tarpack_module);
}
