/*
 * The canonical record's Avro body, encoded and decoded in C for the one record shape changeflow writes
 * (schemas.make_version): a fixed envelope and rows of nullable columns of the types schemas.avro_type
 * gives, arrays of such values included.
 *
 * Why by hand: fastavro walks the schema per datum, and for this record measured 19 us to write and
 * 12 us to read per change (cavro 1.0: 15 and 12), about 40 % of changeflow's CPU per change, paid once in
 * the decode stage and again in each of three sink processes. This module does the same work from a plan
 * made once per schema version. It is a fast path only: schemas/__init__.py falls back to fastavro for
 * any version it cannot plan, and on any error raised here (a value this code does not take, bytes that
 * do not decode), so fastavro stays the reference for every error message and edge case;
 * tests/unit/test_codec.py checks both give the same bytes and the same values.
 *
 * Hostile input: every read is bounds-checked against the buffer, lengths and counts are validated before
 * use, varints are limited to 10 bytes, nothing recurses (arrays hold scalars only).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <datetime.h>
#include <string.h>

enum {
    C_INT = 1, C_LONG, C_FLOAT, C_DOUBLE, C_BOOL, C_BYTES, C_STRING, C_DECIMAL, C_DATE, C_TIME, C_TIMESTAMP,
    C_ARRAY = 64 /* | item code */
};

#define DAYS_SHIFT 719163 /* date(1970, 1, 1).toordinal() */

static PyObject *EPOCH;       /* datetime(1970, 1, 1, tzinfo=UTC) */
static PyObject *EPOCH_DATE;  /* date(1970, 1, 1) */
static PyObject *K_SOURCE, *K_ENTITY, *K_KEY, *K_OP, *K_VERSION, *K_TS_MS, *K_BEFORE, *K_AFTER, *K_PRESENT,
    *K_CARRIED;

/* ---- reading ------------------------------------------------------------------------------------ */
typedef struct {
    const unsigned char *p;
    const unsigned char *end;
} Reader;

static int bad(const char *what) {
    PyErr_Format(PyExc_ValueError, "canonical record: %s", what);
    return -1;
}

static int read_long(Reader *r, long long *out) {
    unsigned long long acc = 0;
    int shift = 0;
    for (int i = 0; i < 10; i++) {
        if (r->p >= r->end) return bad("truncated varint");
        unsigned char b = *r->p++;
        acc |= (unsigned long long)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = (long long)(acc >> 1) ^ -(long long)(acc & 1);
            return 0;
        }
        shift += 7;
    }
    return bad("varint longer than 10 bytes");
}

static int read_len(Reader *r, Py_ssize_t *out) {
    long long n;
    if (read_long(r, &n) < 0) return -1;
    if (n < 0 || n > (long long)(r->end - r->p)) return bad("length beyond the record");
    *out = (Py_ssize_t)n;
    return 0;
}

static PyObject *read_string(Reader *r) {
    Py_ssize_t n;
    if (read_len(r, &n) < 0) return NULL;
    PyObject *s = PyUnicode_DecodeUTF8((const char *)r->p, n, NULL);
    r->p += n;
    return s;
}

typedef struct {
    PyObject *names;      /* tuple of str: the columns, in field order (decode gives rows keyed by these) */
    PyObject *fields;     /* tuple of str: their Avro field names (encode reads rows keyed by these) */
    Py_ssize_t ncols;
    unsigned char *codes; /* per column */
    int *scales;          /* per column (decimals; an array's item's) */
    int *precisions;
    PyObject *decimal_from; /* callable(unscaled: int, scale, precision) -> Decimal */
    PyObject *decimal_to;   /* callable(value, scale, precision) -> bytes */
} Plan;

static PyObject *read_value(Reader *r, int code, int scale, int precision, PyObject *decimal_from) {
    long long v;
    switch (code) {
    case C_INT:
    case C_LONG:
        if (read_long(r, &v) < 0) return NULL;
        return PyLong_FromLongLong(v);
    case C_FLOAT: {
        float f;
        if (r->end - r->p < 4) return bad("truncated float"), NULL;
        memcpy(&f, r->p, 4);
        r->p += 4;
        return PyFloat_FromDouble((double)f);
    }
    case C_DOUBLE: {
        double d;
        if (r->end - r->p < 8) return bad("truncated double"), NULL;
        memcpy(&d, r->p, 8);
        r->p += 8;
        return PyFloat_FromDouble(d);
    }
    case C_BOOL:
        if (r->p >= r->end) return bad("truncated boolean"), NULL;
        return PyBool_FromLong(*r->p++ != 0);
    case C_BYTES: {
        Py_ssize_t n;
        if (read_len(r, &n) < 0) return NULL;
        PyObject *b = PyBytes_FromStringAndSize((const char *)r->p, n);
        r->p += n;
        return b;
    }
    case C_STRING:
        return read_string(r);
    case C_DECIMAL: {
        Py_ssize_t n;
        if (read_len(r, &n) < 0) return NULL;
        PyObject *unscaled = n ? _PyLong_FromByteArray(r->p, (size_t)n, 0, 1) : PyLong_FromLong(0);
        r->p += n;
        if (!unscaled) return NULL;
        PyObject *d = PyObject_CallFunction(decimal_from, "Oii", unscaled, scale, precision);
        Py_DECREF(unscaled);
        return d;
    }
    case C_DATE: {
        if (read_long(r, &v) < 0) return NULL;
        if (v < 1 - DAYS_SHIFT || v > 2932896 /* date.max */) return bad("date out of range"), NULL;
        PyObject *delta = PyDelta_FromDSU((int)v, 0, 0);
        if (!delta) return NULL;
        PyObject *d = PyNumber_Add(EPOCH_DATE, delta);
        Py_DECREF(delta);
        return d;
    }
    case C_TIME: {
        if (read_long(r, &v) < 0) return NULL;
        if (v < 0 || v >= 86400000000LL) return bad("time of day out of range"), NULL;
        long long s = v / 1000000;
        return PyTime_FromTime((int)(s / 3600), (int)(s / 60 % 60), (int)(s % 60), (int)(v % 1000000));
    }
    case C_TIMESTAMP: {
        if (read_long(r, &v) < 0) return NULL;
        long long days = v / 86400000000LL, rest = v % 86400000000LL;
        if (rest < 0) {
            rest += 86400000000LL;
            days -= 1;
        }
        if (days < -719162 || days > 2932896) return bad("timestamp out of range"), NULL;
        PyObject *delta = PyDelta_FromDSU((int)days, (int)(rest / 1000000), (int)(rest % 1000000));
        if (!delta) return NULL;
        PyObject *d = PyNumber_Add(EPOCH, delta);
        Py_DECREF(delta);
        return d;
    }
    }
    PyErr_Format(PyExc_ValueError, "canonical record: unknown column code %d", code);
    return NULL;
}

/* ["null", T]: the branch index, then the value */
static PyObject *read_nullable(Reader *r, int code, int scale, int precision, PyObject *decimal_from);

/* an array's blocks; a column's items are ["null", T] (nullable), the envelope's column lists plain strings */
static PyObject *read_array(Reader *r, int item, int scale, int precision, PyObject *decimal_from, int nullable) {
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    for (;;) {
        long long count;
        if (read_long(r, &count) < 0) goto fail;
        if (count == 0) return list;
        if (count < 0) { /* a block with its size in bytes: skip the size */
            long long size;
            if (count == LLONG_MIN) { bad("array block count"); goto fail; }
            count = -count;
            if (read_long(r, &size) < 0) goto fail;
        }
        if (count > (long long)(r->end - r->p)) { bad("array count beyond the record"); goto fail; }
        for (long long i = 0; i < count; i++) {
            PyObject *v = nullable ? read_nullable(r, item, scale, precision, decimal_from)
                                   : read_value(r, item, scale, precision, decimal_from);
            if (!v) goto fail;
            int rc = PyList_Append(list, v);
            Py_DECREF(v);
            if (rc < 0) goto fail;
        }
    }
fail:
    Py_DECREF(list);
    return NULL;
}

static PyObject *read_nullable(Reader *r, int code, int scale, int precision, PyObject *decimal_from) {
    long long branch;
    if (read_long(r, &branch) < 0) return NULL;
    if (branch == 0) Py_RETURN_NONE;
    if (branch != 1) return bad("union branch out of range"), NULL;
    if (code & C_ARRAY) return read_array(r, code & ~C_ARRAY, scale, precision, decimal_from, 1);
    return read_value(r, code, scale, precision, decimal_from);
}

static PyObject *read_row(Reader *r, Plan *plan) {
    long long branch;
    if (read_long(r, &branch) < 0) return NULL;
    if (branch == 0) Py_RETURN_NONE;
    if (branch != 1) return bad("row union branch out of range"), NULL;
    PyObject *row = PyDict_New();
    if (!row) return NULL;
    for (Py_ssize_t i = 0; i < plan->ncols; i++) {
        PyObject *v = read_nullable(r, plan->codes[i], plan->scales[i], plan->precisions[i], plan->decimal_from);
        if (!v || PyDict_SetItem(row, PyTuple_GET_ITEM(plan->names, i), v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(row);
            return NULL;
        }
        Py_DECREF(v);
    }
    return row;
}

static PyObject *read_names(Reader *r) {
    long long branch;
    if (read_long(r, &branch) < 0) return NULL;
    if (branch == 0) Py_RETURN_NONE;
    if (branch != 1) return bad("union branch out of range"), NULL;
    return read_array(r, C_STRING, 0, 0, NULL, 0);
}

/* ---- the plan: a capsule made once per schema version ---------------------------------------------- */
static void plan_free(PyObject *capsule) {
    Plan *p = PyCapsule_GetPointer(capsule, "changeflow.codec.plan");
    if (!p) return;
    Py_XDECREF(p->names);
    Py_XDECREF(p->fields);
    Py_XDECREF(p->decimal_from);
    Py_XDECREF(p->decimal_to);
    PyMem_Free(p->codes);
    PyMem_Free(p->scales);
    PyMem_Free(p->precisions);
    PyMem_Free(p);
}

/* plan(names, fields: tuple[str], codes, scales, precisions: tuple[int], decimal_from, decimal_to) */
static PyObject *make_plan(PyObject *self, PyObject *args) {
    PyObject *names, *fields, *codes, *scales, *precisions, *from, *to;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!OO", &PyTuple_Type, &names, &PyTuple_Type, &fields, &PyTuple_Type, &codes,
                          &PyTuple_Type, &scales, &PyTuple_Type, &precisions, &from, &to))
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (PyTuple_GET_SIZE(fields) != n || PyTuple_GET_SIZE(codes) != n || PyTuple_GET_SIZE(scales) != n ||
        PyTuple_GET_SIZE(precisions) != n)
        return PyErr_Format(PyExc_ValueError, "plan: names, fields, codes, scales and precisions differ in length");
    Plan *p = PyMem_Calloc(1, sizeof(Plan));
    if (!p) return PyErr_NoMemory();
    p->ncols = n;
    p->codes = PyMem_Calloc(n ? n : 1, 1);
    p->scales = PyMem_Calloc(n ? n : 1, sizeof(int));
    p->precisions = PyMem_Calloc(n ? n : 1, sizeof(int));
    Py_INCREF(names);
    p->names = names;
    Py_INCREF(fields);
    p->fields = fields;
    Py_INCREF(from);
    p->decimal_from = from;
    Py_INCREF(to);
    p->decimal_to = to;
    PyObject *capsule = PyCapsule_New(p, "changeflow.codec.plan", plan_free);
    if (!capsule || !p->codes || !p->scales || !p->precisions) {
        if (capsule) Py_DECREF(capsule);
        else {
            /* plan_free needs the capsule; free by hand */
            Py_DECREF(names); Py_DECREF(fields); Py_DECREF(from); Py_DECREF(to);
            PyMem_Free(p->codes); PyMem_Free(p->scales); PyMem_Free(p->precisions); PyMem_Free(p);
        }
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(names, i)) || !PyUnicode_Check(PyTuple_GET_ITEM(fields, i))) {
            Py_DECREF(capsule);
            return PyErr_Format(PyExc_TypeError, "plan: column and field names must be str");
        }
        long c = PyLong_AsLong(PyTuple_GET_ITEM(codes, i));
        long s = PyLong_AsLong(PyTuple_GET_ITEM(scales, i));
        long pr = PyLong_AsLong(PyTuple_GET_ITEM(precisions, i));
        if (PyErr_Occurred()) { Py_DECREF(capsule); return NULL; }
        int item = (int)(c & ~C_ARRAY);
        if (item < C_INT || item > C_TIMESTAMP || (c & ~(C_ARRAY | 0x3F)) != 0) {
            Py_DECREF(capsule);
            return PyErr_Format(PyExc_ValueError, "plan: unknown column code %ld", c);
        }
        p->codes[i] = (unsigned char)c;
        p->scales[i] = (int)s;
        p->precisions[i] = (int)pr;
    }
    return capsule;
}

/* decode(data: bytes, start: int, plan) -> dict, the record as fastavro gives it, rows keyed by column name */
static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t start;
    PyObject *capsule;
    if (!PyArg_ParseTuple(args, "y*nO", &buf, &start, &capsule)) return NULL;
    Plan *plan = PyCapsule_GetPointer(capsule, "changeflow.codec.plan");
    PyObject *out = NULL, *v = NULL;
    if (!plan) goto done;
    if (start < 0 || start > buf.len) { bad("start beyond the record"); goto done; }
    Reader r = {(const unsigned char *)buf.buf + start, (const unsigned char *)buf.buf + buf.len};
    out = PyDict_New();
    if (!out) goto done;
    PyObject *keys[] = {K_SOURCE, K_ENTITY, K_KEY, K_OP};
    for (int i = 0; i < 4; i++) {
        if (!(v = read_string(&r)) || PyDict_SetItem(out, keys[i], v) < 0) goto fail;
        Py_CLEAR(v);
    }
    long long n;
    if (read_long(&r, &n) < 0 || !(v = PyLong_FromLongLong(n)) || PyDict_SetItem(out, K_VERSION, v) < 0) goto fail;
    Py_CLEAR(v);
    if (read_long(&r, &n) < 0 || !(v = PyLong_FromLongLong(n)) || PyDict_SetItem(out, K_TS_MS, v) < 0) goto fail;
    Py_CLEAR(v);
    if (!(v = read_row(&r, plan)) || PyDict_SetItem(out, K_BEFORE, v) < 0) goto fail;
    Py_CLEAR(v);
    if (!(v = read_row(&r, plan)) || PyDict_SetItem(out, K_AFTER, v) < 0) goto fail;
    Py_CLEAR(v);
    if (!(v = read_names(&r)) || PyDict_SetItem(out, K_PRESENT, v) < 0) goto fail;
    Py_CLEAR(v);
    if (!(v = read_names(&r)) || PyDict_SetItem(out, K_CARRIED, v) < 0) goto fail;
    Py_CLEAR(v);
    if (r.p != r.end) { bad("bytes left after the record"); goto fail; }
    goto done;
fail:
    Py_XDECREF(v);
    Py_CLEAR(out);
done:
    PyBuffer_Release(&buf);
    return out;
}

/* ---- writing ------------------------------------------------------------------------------------ */
typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Writer;

static int grow(Writer *w, Py_ssize_t need) {
    if (w->len + need <= w->cap) return 0;
    Py_ssize_t cap = w->cap * 2;
    while (cap < w->len + need) cap *= 2;
    char *d = PyMem_Realloc(w->data, cap);
    if (!d) { PyErr_NoMemory(); return -1; }
    w->data = d;
    w->cap = cap;
    return 0;
}

static int write_long(Writer *w, long long v) {
    if (grow(w, 10) < 0) return -1;
    unsigned long long z = ((unsigned long long)v << 1) ^ (unsigned long long)(v >> 63);
    while (z > 0x7F) {
        w->data[w->len++] = (char)((z & 0x7F) | 0x80);
        z >>= 7;
    }
    w->data[w->len++] = (char)z;
    return 0;
}

static int write_raw(Writer *w, const char *p, Py_ssize_t n) {
    if (write_long(w, n) < 0 || grow(w, n) < 0) return -1;
    memcpy(w->data + w->len, p, n);
    w->len += n;
    return 0;
}

static int write_str(Writer *w, PyObject *v) {
    if (!PyUnicode_Check(v)) return bad("a string column holds a non-string");
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(v, &n);
    if (!s) return -1;
    return write_raw(w, s, n);
}

static int write_int(Writer *w, PyObject *v, int bits32) {
    if (!PyLong_Check(v) || PyBool_Check(v)) return bad("an integer column holds a non-integer");
    int overflow = 0;
    long long n = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (n == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return bad("integer beyond 64 bits");
    }
    if (bits32 && (n < INT32_MIN || n > INT32_MAX)) return bad("integer beyond 32 bits");
    return write_long(w, n);
}

static int write_value(Writer *w, PyObject *v, int code, int scale, int precision, Plan *plan) {
    switch (code) {
    case C_INT:
        return write_int(w, v, 1);
    case C_LONG:
        return write_int(w, v, 0);
    case C_FLOAT:
    case C_DOUBLE: {
        if (!PyFloat_Check(v) && !(PyLong_Check(v) && !PyBool_Check(v))) return bad("a float column holds a non-number");
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) return -1;
        if (grow(w, 8) < 0) return -1;
        if (code == C_FLOAT) {
            float f = (float)d;
            memcpy(w->data + w->len, &f, 4);
            w->len += 4;
        } else {
            memcpy(w->data + w->len, &d, 8);
            w->len += 8;
        }
        return 0;
    }
    case C_BOOL:
        if (!PyBool_Check(v)) return bad("a boolean column holds a non-boolean");
        if (grow(w, 1) < 0) return -1;
        w->data[w->len++] = (char)(v == Py_True);
        return 0;
    case C_BYTES:
        if (!PyBytes_Check(v)) return bad("a bytes column holds a non-bytes value");
        return write_raw(w, PyBytes_AS_STRING(v), PyBytes_GET_SIZE(v));
    case C_STRING:
        return write_str(w, v);
    case C_DECIMAL: {
        PyObject *b = PyObject_CallFunction(plan->decimal_to, "Oii", v, scale, precision);
        if (!b) return -1;
        int rc = PyBytes_Check(b) ? write_raw(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
                                  : bad("decimal bytes are not bytes");
        Py_DECREF(b);
        return rc;
    }
    case C_DATE: {
        if (!PyDate_Check(v) || PyDateTime_Check(v)) return bad("a date column holds a non-date");
        PyObject *delta = PyNumber_Subtract(v, EPOCH_DATE);
        if (!delta) return -1;
        long long days = PyDateTime_DELTA_GET_DAYS(delta);
        Py_DECREF(delta);
        return write_long(w, days);
    }
    case C_TIME:
        if (!PyTime_Check(v)) return bad("a time column holds a non-time");
        if (((PyDateTime_Time *)v)->hastzinfo && ((PyDateTime_Time *)v)->tzinfo != Py_None)
            return bad("a time of day with a time zone");
        return write_long(w, (long long)PyDateTime_TIME_GET_HOUR(v) * 3600000000LL +
                                 (long long)PyDateTime_TIME_GET_MINUTE(v) * 60000000LL +
                                 (long long)PyDateTime_TIME_GET_SECOND(v) * 1000000LL +
                                 PyDateTime_TIME_GET_MICROSECOND(v));
    case C_TIMESTAMP: {
        if (!PyDateTime_Check(v)) return bad("a timestamp column holds a non-datetime");
        PyObject *tz = PyObject_GetAttrString(v, "tzinfo");
        if (!tz) return -1;
        int naive = tz == Py_None;
        Py_DECREF(tz);
        if (naive) return bad("a naive timestamp");
        PyObject *delta = PyNumber_Subtract(v, EPOCH);
        if (!delta) return -1;
        long long us = ((long long)PyDateTime_DELTA_GET_DAYS(delta) * 86400LL + PyDateTime_DELTA_GET_SECONDS(delta)) *
                           1000000LL + PyDateTime_DELTA_GET_MICROSECONDS(delta);
        Py_DECREF(delta);
        return write_long(w, us);
    }
    }
    PyErr_Format(PyExc_ValueError, "canonical record: unknown column code %d", code);
    return -1;
}

static int write_nullable(Writer *w, PyObject *v, int code, int scale, int precision, Plan *plan) {
    if (v == NULL || v == Py_None) return write_long(w, 0);
    if (write_long(w, 1) < 0) return -1;
    if (!(code & C_ARRAY)) return write_value(w, v, code, scale, precision, plan);
    if (!PyList_Check(v)) return bad("an array column holds a non-list");
    Py_ssize_t n = PyList_GET_SIZE(v);
    if (n > 0) {
        if (write_long(w, n) < 0) return -1;
        for (Py_ssize_t i = 0; i < n; i++) {
            /* a list may change under a callback (decimal_to): read each item by index, bounds-checked */
            if (i >= PyList_GET_SIZE(v)) return bad("an array changed while it was written");
            PyObject *item = PyList_GET_ITEM(v, i);
            Py_INCREF(item);
            int rc = write_nullable(w, item, code & ~C_ARRAY, scale, precision, plan);
            Py_DECREF(item);
            if (rc < 0) return -1;
        }
    }
    return write_long(w, 0);
}

static int write_row(Writer *w, PyObject *row, Plan *plan) {
    if (row == NULL || row == Py_None) return write_long(w, 0);
    if (!PyDict_Check(row)) return bad("a row is not a dict");
    if (write_long(w, 1) < 0) return -1;
    for (Py_ssize_t i = 0; i < plan->ncols; i++) {
        PyObject *v = PyDict_GetItemWithError(row, PyTuple_GET_ITEM(plan->fields, i));
        if (!v && PyErr_Occurred()) return -1;
        Py_XINCREF(v);
        int rc = write_nullable(w, v, plan->codes[i], plan->scales[i], plan->precisions[i], plan);
        Py_XDECREF(v);
        if (rc < 0) return -1;
    }
    return 0;
}

static int write_names(Writer *w, PyObject *v) {
    if (v == NULL || v == Py_None) return write_long(w, 0);
    if (!PyList_Check(v)) return bad("a column list is not a list");
    if (write_long(w, 1) < 0) return -1;
    Py_ssize_t n = PyList_GET_SIZE(v);
    if (n > 0) {
        if (write_long(w, n) < 0) return -1;
        for (Py_ssize_t i = 0; i < n; i++)
            if (write_str(w, PyList_GET_ITEM(v, i)) < 0) return -1;
    }
    return write_long(w, 0);
}

static PyObject *field(PyObject *record, PyObject *key) {
    PyObject *v = PyDict_GetItemWithError(record, key);
    if (!v && !PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "canonical record: no field %R", key);
    return v;
}

/* encode(prefix: bytes, record: dict, plan) -> prefix + body; rows keyed by Avro field name, wire values */
static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer prefix;
    PyObject *record, *capsule, *v;
    if (!PyArg_ParseTuple(args, "y*O!O", &prefix, &PyDict_Type, &record, &capsule)) return NULL;
    Plan *plan = PyCapsule_GetPointer(capsule, "changeflow.codec.plan");
    Writer w = {PyMem_Malloc(512), 0, 512};
    PyObject *out = NULL;
    if (!plan) goto done;
    if (!w.data) { PyErr_NoMemory(); goto done; }
    if (grow(&w, prefix.len) < 0) goto done;
    memcpy(w.data, prefix.buf, prefix.len);
    w.len = prefix.len;
    PyObject *strings[] = {K_SOURCE, K_ENTITY, K_KEY, K_OP};
    for (int i = 0; i < 4; i++)
        if (!(v = field(record, strings[i])) || write_str(&w, v) < 0) goto done;
    if (!(v = field(record, K_VERSION)) || write_int(&w, v, 0) < 0) goto done;
    if (!(v = field(record, K_TS_MS)) || write_int(&w, v, 0) < 0) goto done;
    v = PyDict_GetItemWithError(record, K_BEFORE);
    if (PyErr_Occurred() || write_row(&w, v, plan) < 0) goto done;
    v = PyDict_GetItemWithError(record, K_AFTER);
    if (PyErr_Occurred() || write_row(&w, v, plan) < 0) goto done;
    v = PyDict_GetItemWithError(record, K_PRESENT);
    if (PyErr_Occurred() || write_names(&w, v) < 0) goto done;
    v = PyDict_GetItemWithError(record, K_CARRIED);
    if (PyErr_Occurred() || write_names(&w, v) < 0) goto done;
    out = PyBytes_FromStringAndSize(w.data, w.len);
done:
    PyMem_Free(w.data);
    PyBuffer_Release(&prefix);
    return out;
}

static PyMethodDef methods[] = {
    {"plan", make_plan, METH_VARARGS, "A column plan for encode and decode, made once per schema version."},
    {"decode", decode, METH_VARARGS, "decode(data, start, plan) -> the record (rows keyed by column name)."},
    {"encode", encode, METH_VARARGS, "encode(prefix, record, plan) -> prefix + the record's Avro body."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__codec(void) {
    PyDateTime_IMPORT;
    if (!PyDateTimeAPI) return NULL;
    EPOCH_DATE = PyDate_FromDate(1970, 1, 1);
    EPOCH = PyDateTimeAPI->DateTime_FromDateAndTime(1970, 1, 1, 0, 0, 0, 0, PyDateTime_TimeZone_UTC,
                                                   PyDateTimeAPI->DateTimeType);
    K_SOURCE = PyUnicode_InternFromString("source");
    K_ENTITY = PyUnicode_InternFromString("entity");
    K_KEY = PyUnicode_InternFromString("key");
    K_OP = PyUnicode_InternFromString("op");
    K_VERSION = PyUnicode_InternFromString("version");
    K_TS_MS = PyUnicode_InternFromString("ts_ms");
    K_BEFORE = PyUnicode_InternFromString("before");
    K_AFTER = PyUnicode_InternFromString("after");
    K_PRESENT = PyUnicode_InternFromString("present");
    K_CARRIED = PyUnicode_InternFromString("carried");
    if (!EPOCH || !EPOCH_DATE || !K_CARRIED) return NULL;
    return PyModule_Create(&module);
}
