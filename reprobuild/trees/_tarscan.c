/* reprobuild.trees._tarscan: the tar reader's per-header loop, compiled (optional).
 *
 *   scan(buffer, buffer_start, offset, file_size)
 *       -> (rows, next_offset): the plain members whose headers follow each other from
 *          file offset `offset`, read from `buffer` (the file's bytes from offset
 *          `buffer_start`), one row each:
 *              (name, is_directory, mode, uid, gid, mtime, size, offset_data)
 *          and the offset of the first header not taken.
 *
 * A plain member is what tar_headers.fast_headers reads into a Header with no pax
 * records and tar_reader._plain_member makes into an entry: a ustar header with a
 * valid checksum, plain octal numbers (as tar_headers._number reads them), an empty
 * prefix field, and type '0' with 0 < size and its bytes inside the file, or type '5'
 * (its name's trailing slashes dropped, as the Python reader does). The scan stops
 * before anything else - the end-of-archive block, a pax header, a link, a device, a
 * header outside the buffer or the file - and the Python reader takes that member, so
 * the rows are exactly the members the Python path would have made the same way.
 * tests/trees/test_tarscan.py checks both give the same tree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#define BLOCK 512

/* struct posix_header (POSIX ustar; GNU tar src/tar.h) field offsets and widths. */
#define OFF_NAME 0
#define LEN_NAME 100
#define OFF_CHKSUM 148
#define OFF_TYPEFLAG 156
#define OFF_PREFIX 345

static const struct { int offset, width; } NUMBERS[] = {
    {100, 8},  /* mode */
    {108, 8},  /* uid */
    {116, 8},  /* gid */
    {124, 12}, /* size */
    {136, 12}, /* mtime */
    {329, 8},  /* devmajor */
    {337, 8},  /* devminor */
};
enum { MODE, UID, GID, SIZE, MTIME, DEVMAJOR, DEVMINOR, N_NUMBERS };

static int
is_space(unsigned char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

/* tar_headers._number: up to the first NUL, ASCII whitespace stripped, octal digits
 * only (none is 0); 0 for anything else (base-256, other characters). */
static int
octal_field(const unsigned char *field, int width, long long *value)
{
    if (field[0] == 0200 || field[0] == 0377) {
        return 0;
    }
    int end = 0;
    while (end < width && field[end] != '\0') {
        end++;
    }
    int start = 0;
    while (start < end && is_space(field[start])) {
        start++;
    }
    while (end > start && is_space(field[end - 1])) {
        end--;
    }
    long long result = 0; /* at most 12 digits: 36 bits */
    for (int i = start; i < end; i++) {
        if (field[i] < '0' || field[i] > '7') {
            return 0;
        }
        result = result * 8 + (field[i] - '0');
    }
    *value = result;
    return 1;
}

/* The row of the plain member whose header is `header` (at file offset `offset`), and
 * the offset of the next header; NULL without an exception when the member is not plain,
 * NULL with one on failure. */
static PyObject *
plain_row(const unsigned char *header, long long offset, long long file_size,
          long long *next)
{
    unsigned char type = header[OFF_TYPEFLAG];
    if ((type != '0' && type != '5') || header[OFF_PREFIX] != '\0') {
        return NULL;
    }
    long long checksum_field, numbers[N_NUMBERS];
    if (!octal_field(header + OFF_CHKSUM, 8, &checksum_field)) {
        return NULL;
    }
    long long checksum = 8 * ' ';
    for (int i = 0; i < BLOCK; i++) {
        if (i < OFF_CHKSUM || i >= OFF_CHKSUM + 8) {
            checksum += header[i];
        }
    }
    if (checksum != checksum_field) {
        return NULL;
    }
    for (int i = 0; i < N_NUMBERS; i++) {
        if (!octal_field(header + NUMBERS[i].offset, NUMBERS[i].width, &numbers[i])) {
            return NULL;
        }
    }
    long long offset_data = offset + BLOCK, size = numbers[SIZE];
    Py_ssize_t name_length = 0;
    while (name_length < LEN_NAME && header[OFF_NAME + name_length] != '\0') {
        name_length++;
    }
    if (type == '0') {
        /* size < 8 ** 11 and offset_data < file_size: no overflow below. */
        if (size <= 0 || offset_data + size > file_size) {
            return NULL;
        }
        *next = offset_data + (size + BLOCK - 1) / BLOCK * BLOCK;
    } else {
        while (name_length > 0 && header[OFF_NAME + name_length - 1] == '/') {
            name_length--;
        }
        *next = offset_data;
    }
    return Py_BuildValue("(y#OLLLLLL)", (const char *)header + OFF_NAME, name_length,
                         type == '5' ? Py_True : Py_False, numbers[MODE], numbers[UID],
                         numbers[GID], numbers[MTIME], size, offset_data);
}

static PyObject *
tarscan_scan(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "scan() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "scan(): buffer must be bytes");
        return NULL;
    }
    const unsigned char *buffer = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    long long buffer_length = PyBytes_GET_SIZE(args[0]);
    long long buffer_start = PyLong_AsLongLong(args[1]);
    long long offset = PyLong_AsLongLong(args[2]);
    long long file_size = PyLong_AsLongLong(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (buffer_start < 0 || offset < 0 || file_size < 0
        || file_size > LLONG_MAX / 2 || buffer_start > LLONG_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "scan(): offsets out of range");
        return NULL;
    }
    PyObject *rows = PyList_New(0);
    if (rows == NULL) {
        return NULL;
    }
    /* Each header read lies wholly inside both the buffer and the file. */
    while (offset >= buffer_start && offset - buffer_start + BLOCK <= buffer_length
           && offset + BLOCK <= file_size) {
        long long next = offset;
        PyObject *row = plain_row(buffer + (offset - buffer_start), offset, file_size, &next);
        if (row == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(rows);
                return NULL;
            }
            break;
        }
        int failed = PyList_Append(rows, row);
        Py_DECREF(row);
        if (failed) {
            Py_DECREF(rows);
            return NULL;
        }
        offset = next;
    }
    PyObject *result = Py_BuildValue("(NL)", rows, offset);
    return result;
}

static PyMethodDef tarscan_methods[] = {
    {"scan", (PyCFunction)(void (*)(void))tarscan_scan, METH_FASTCALL,
     "scan(buffer, buffer_start, offset, file_size) -> (rows, next_offset): the plain"
     " members from offset on, (name, is_directory, mode, uid, gid, mtime, size,"
     " offset_data) each"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef tarscan_module = {
    PyModuleDef_HEAD_INIT, "_tarscan",
    "The tar reader's per-header loop, compiled (optional; see tar_reader.py).", -1,
    tarscan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__tarscan(void)
{
    return PyModule_Create(&tarscan_module);
}
