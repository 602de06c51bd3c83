/* The dispatcher's hot path in C (built on first GPU use by jitkern.fastcall; see there).
 *
 * Two callable types:
 *
 *   Dispatch(tensors, statics, memo, slow)
 *       call(args): the signature of ``args`` -- a tuple with, per tensor position, None or
 *       (type(t), t.shape, t.stride(), t.dtype, t.device), then the static arguments -- looked up in
 *       ``memo``; a Fire found there runs in C, any other callable is called with ``args``;
 *       None means nothing to launch. A signature not in ``memo``, or arguments that cannot be
 *       keyed, go to ``slow(args)``. The key is built exactly as jitkern.dispatch's Python key,
 *       so both paths share one memo.
 *
 *   Fire(name, launches, prepare)
 *       call(args): runs each launch, returns ``name``. ``prepare`` (or None) maps ``args`` to the
 *       argument tuple the launches read (per-call scratch buffers appended). A launch is
 *       (how, grid, stream_fn, device, function, slots, misaligned, check) + how's own fields; the
 *       kernel arguments are made from ``slots`` in kernel order: ("t", i) the address of args[i]
 *       (data_ptr(), all OR-ed and checked for 16-byte alignment: ``misaligned(args)`` raises the
 *       error), ("s", i, is_int, lo, hi) a per-call scalar taken as is when it is exactly an
 *       int/float within [lo, hi] and finite, otherwise ``check(args)`` converts (or rejects) all
 *       of the launch's scalars, ("c", value) a constant.
 *         how "triton" + (c_launch, fixed): calls Triton's generated C launch,
 *           c_launch(gx, gy, gz, stream_fn(device), function, *fixed, *kernel_args);
 *         how "driver" + (launch_fn, block, shared, types, failed): calls the driver's
 *           cuLaunchKernel / hipModuleLaunchKernel (``launch_fn``: its address) with the kernel
 *           arguments packed by ``types`` (one struct code per argument: b h i q B H I Q f d, or
 *           P for a pointer, e fp16, g bf16 (truncated, as Triton packs it)) into 8-byte slots;
 *           ``trailing`` (a tuple) are constants after the call's arguments (Triton's scratch
 *           pointers); a non-zero result calls ``failed(code)``, which raises. ``scratch``: None,
 *           or (bytes per program, alloc): ``alloc(grid size x bytes)`` returns a buffer (a tensor)
 *           per launch whose address replaces the first trailing constant (Triton's global
 *           scratch), held until the launch is queued.
 *
 * And the CUDA driver calls jitkern needs to load a cubin without Triton's runtime (libcuda.so.1 is
 * opened on first use; no CUDA headers are needed to build this file):
 *
 *   load_cubin(image, name, shared, device) -> (function, n_regs, n_spills, max_threads)
 *   cu_launch_kernel() -> the address of cuLaunchKernel
 *   launch(launch_fn, function, grid, block, shared, stream, types, args) -> None
 *       one launch with every argument given (integers, floats), packed as above
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <dlfcn.h>

#define MAX_STACK 96

static PyObject *s_shape, *s_stride, *s_dtype, *s_device, *s_data_ptr;

/* What jitkern/torchsig.cpp exports (its capsule ``api``; the layout is repeated there). Set once by
 * use_torch(); until then, and for any tensor it declines (-1), the Python attributes are read. */
typedef struct {
    int version;
    PyTypeObject *tensor_type, *param_type;
    Py_ssize_t (*words)(PyObject *, long long *, Py_ssize_t);
    int (*data_ptr)(PyObject *, unsigned long long *);
} TorchSig;

static const TorchSig *g_sig = NULL;
#define SIG_WORDS 512

/* ---------------------------------------------------------------------------------- Fire */

enum { SLOT_T = 0, SLOT_S = 1, SLOT_C = 2 };

typedef struct {
    int kind;
    Py_ssize_t index;   /* T, S: argument position */
    int is_int;         /* S */
    double lo, hi;      /* S */
    PyObject *value;    /* C: owned */
} Slot;

/* cuLaunchKernel and hipModuleLaunchKernel have this signature */
typedef int (*driver_launch_t)(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared, void *stream, void **params, void **extra);

enum { HOW_TRITON = 0, HOW_DRIVER = 1 };

typedef struct {
    int how;
    PyObject *c_launch, *gx, *gy, *gz, *stream_fn, *device, *function, *fixed, *misaligned, *check, *failed;
    Py_ssize_t nfixed, nslots, nscalars;
    Slot *slots;
    /* HOW_DRIVER */
    driver_launch_t launch_fn;
    void *fn_handle;
    unsigned grid[3], block[3], shared;
    char *types;
    PyObject *trailing;  /* constants after the call's arguments */
    PyObject *scratch_alloc;  /* None, or alloc(nbytes) -> buffer with data_ptr() */
    unsigned long long scratch_bytes;  /* per launch: grid size x bytes per program */
} LaunchRec;

typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *prepare;
    Py_ssize_t nlaunch;
    LaunchRec *launches;
    vectorcallfunc vectorcall;
} Fire;

static void launch_clear(LaunchRec *l) {
    Py_CLEAR(l->c_launch); Py_CLEAR(l->gx); Py_CLEAR(l->gy); Py_CLEAR(l->gz); Py_CLEAR(l->stream_fn);
    Py_CLEAR(l->device); Py_CLEAR(l->function); Py_CLEAR(l->fixed); Py_CLEAR(l->misaligned); Py_CLEAR(l->check);
    Py_CLEAR(l->failed);
    Py_CLEAR(l->trailing);
    Py_CLEAR(l->scratch_alloc);
    PyMem_Free(l->types);
    l->types = NULL;
    if (l->slots) {
        for (Py_ssize_t i = 0; i < l->nslots; i++) Py_CLEAR(l->slots[i].value);
        PyMem_Free(l->slots);
        l->slots = NULL;
    }
}

static void Fire_dealloc(Fire *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->name);
    Py_CLEAR(self->prepare);
    if (self->launches) {
        for (Py_ssize_t i = 0; i < self->nlaunch; i++) launch_clear(&self->launches[i]);
        PyMem_Free(self->launches);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Fire_traverse(Fire *self, visitproc visit, void *arg) {
    Py_VISIT(self->name);
    Py_VISIT(self->prepare);
    for (Py_ssize_t i = 0; i < self->nlaunch; i++) {
        LaunchRec *l = &self->launches[i];
        Py_VISIT(l->c_launch); Py_VISIT(l->stream_fn); Py_VISIT(l->misaligned); Py_VISIT(l->check);
        Py_VISIT(l->fixed); Py_VISIT(l->failed); Py_VISIT(l->scratch_alloc);
        for (Py_ssize_t k = 0; k < l->nslots; k++) Py_VISIT(l->slots[k].value);
    }
    return 0;
}

static int parse_slot(PyObject *item, Slot *s, Py_ssize_t *nscalars) {
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) < 2) {
        PyErr_SetString(PyExc_TypeError, "a slot is a tuple (kind, ...)");
        return -1;
    }
    const char *kind = PyUnicode_AsUTF8(PyTuple_GET_ITEM(item, 0));
    if (!kind) return -1;
    s->value = NULL;
    if (kind[0] == 't') {
        s->kind = SLOT_T;
        s->index = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
    } else if (kind[0] == 's') {
        if (PyTuple_GET_SIZE(item) != 5) {
            PyErr_SetString(PyExc_TypeError, "a scalar slot is ('s', index, is_int, lo, hi)");
            return -1;
        }
        s->kind = SLOT_S;
        s->index = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        s->is_int = PyObject_IsTrue(PyTuple_GET_ITEM(item, 2));
        s->lo = PyFloat_AsDouble(PyTuple_GET_ITEM(item, 3));
        s->hi = PyFloat_AsDouble(PyTuple_GET_ITEM(item, 4));
        (*nscalars)++;
    } else if (kind[0] == 'c') {
        s->kind = SLOT_C;
        s->value = Py_NewRef(PyTuple_GET_ITEM(item, 1));
    } else {
        PyErr_Format(PyExc_ValueError, "unknown slot kind %s", kind);
        return -1;
    }
    return PyErr_Occurred() ? -1 : 0;
}

static int parse_dims(PyObject *t, unsigned out[3], const char *what) {
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
        PyErr_Format(PyExc_TypeError, "%s must be a 3-tuple", what);
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        unsigned long v = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, i));
        if (PyErr_Occurred()) return -1;
        out[i] = (unsigned)v;
    }
    return 0;
}

static const char PACK_CODES[] = "bhiqBHIQfdPeg";

static int parse_launch(PyObject *t, LaunchRec *l) {
    PyObject *grid, *slots, *extra;
    const char *how;
    memset(l, 0, sizeof(*l));
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) < 8) {
        PyErr_SetString(PyExc_TypeError, "a launch is (how, grid, stream_fn, device, function, slots, misaligned, check, ...)");
        return -1;
    }
    PyObject *head = PyTuple_GetSlice(t, 0, 8);
    if (!head) return -1;
    int ok = PyArg_ParseTuple(head, "sOOOOOOO", &how, &grid, &l->stream_fn, &l->device, &l->function, &slots,
                              &l->misaligned, &l->check);
    Py_DECREF(head);
    if (!ok) return -1;
    Py_INCREF(l->stream_fn); Py_INCREF(l->device); Py_INCREF(l->function); Py_INCREF(l->misaligned);
    Py_INCREF(l->check);
    if (parse_dims(grid, l->grid, "grid") < 0) return -1;
    l->gx = Py_NewRef(PyTuple_GET_ITEM(grid, 0));
    l->gy = Py_NewRef(PyTuple_GET_ITEM(grid, 1));
    l->gz = Py_NewRef(PyTuple_GET_ITEM(grid, 2));
    extra = PyTuple_GetSlice(t, 8, PyTuple_GET_SIZE(t));
    if (!extra) return -1;
    if (strcmp(how, "triton") == 0) {
        l->how = HOW_TRITON;
        ok = PyArg_ParseTuple(extra, "OO!", &l->c_launch, &PyTuple_Type, &l->fixed);
        if (ok) { Py_INCREF(l->c_launch); Py_INCREF(l->fixed); l->nfixed = PyTuple_GET_SIZE(l->fixed); }
    } else if (strcmp(how, "driver") == 0) {
        PyObject *fn_addr, *block;
        const char *types;
        l->how = HOW_DRIVER;
        PyObject *scratch;
        ok = PyArg_ParseTuple(extra, "OOIsOO!O", &fn_addr, &block, &l->shared, &types, &l->failed, &PyTuple_Type,
                              &l->trailing, &scratch);
        if (ok && scratch != Py_None) {
            unsigned long long per_program;
            if (!PyArg_ParseTuple(scratch, "KO", &per_program, &l->scratch_alloc) || PyTuple_GET_SIZE(l->trailing) < 1) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "scratch needs a trailing slot");
                ok = 0;
            } else {
                Py_INCREF(l->scratch_alloc);
                l->scratch_bytes = per_program * l->grid[0] * l->grid[1] * l->grid[2];
            }
        }
        if (ok) {
            Py_INCREF(l->failed);
            Py_INCREF(l->trailing);
            l->launch_fn = (driver_launch_t)PyLong_AsVoidPtr(fn_addr);
            l->fn_handle = PyLong_AsVoidPtr(l->function);
            ok = !PyErr_Occurred() && l->launch_fn && parse_dims(block, l->block, "block") == 0;
            if (ok && !(l->types = PyMem_Malloc(strlen(types) + 1))) { PyErr_NoMemory(); ok = 0; }
            if (ok) strcpy(l->types, types);
            for (const char *c = types; ok && *c; c++)
                if (!strchr(PACK_CODES, *c)) { PyErr_Format(PyExc_ValueError, "unknown type code %c", *c); ok = 0; }
            if (ok && !PyErr_Occurred() && !l->launch_fn) PyErr_SetString(PyExc_ValueError, "no launch function");
        }
    } else {
        PyErr_Format(PyExc_ValueError, "unknown launch kind %s", how);
        ok = 0;
    }
    Py_DECREF(extra);
    if (!ok) return -1;
    PyObject *seq = PySequence_Fast(slots, "slots must be a sequence");
    if (!seq) return -1;
    l->nslots = PySequence_Fast_GET_SIZE(seq);
    if (5 + l->nfixed + l->nslots > MAX_STACK) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many kernel arguments for the C fast path");
        return -1;
    }
    l->slots = PyMem_Calloc(l->nslots ? l->nslots : 1, sizeof(Slot));
    if (!l->slots) { Py_DECREF(seq); PyErr_NoMemory(); return -1; }
    for (Py_ssize_t i = 0; i < l->nslots; i++) {
        if (parse_slot(PySequence_Fast_GET_ITEM(seq, i), &l->slots[i], &l->nscalars) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    if (l->how == HOW_DRIVER && (Py_ssize_t)strlen(l->types) != l->nslots + PyTuple_GET_SIZE(l->trailing)) {
        PyErr_SetString(PyExc_ValueError, "one type code per kernel argument (and per trailing constant)");
        return -1;
    }
    if (l->how == HOW_DRIVER && l->nslots + PyTuple_GET_SIZE(l->trailing) > MAX_STACK) {
        PyErr_SetString(PyExc_ValueError, "too many kernel arguments for the C fast path");
        return -1;
    }
    return 0;
}

/* ``v`` packed by struct code ``code`` into an 8-byte slot; -1 with an exception set. */
static int pack(char code, PyObject *v, uint64_t *slot) {
    *slot = 0;
    switch (code) {
    case 'f': { float f = (float)PyFloat_AsDouble(v); memcpy(slot, &f, 4); break; }
    case 'e': {
        double d = PyFloat_AsDouble(v);
        if (d == -1.0 && PyErr_Occurred()) return -1;
        if (PyFloat_Pack2(d, (char *)slot, 1) < 0) return -1;
        break;
    }
    case 'g': {  /* bf16: the top half of the fp32 bits, as Triton's launcher packs it */
        float f = (float)PyFloat_AsDouble(v);
        uint32_t u;
        memcpy(&u, &f, 4);
        uint16_t h = (uint16_t)(u >> 16);
        memcpy(slot, &h, 2);
        break;
    }
    case 'd': { double d = PyFloat_AsDouble(v); memcpy(slot, &d, 8); break; }
    case 'P': case 'Q': case 'B': case 'H': case 'I': {
        unsigned long long u = PyLong_AsUnsignedLongLongMask(v);
        if (code == 'B') { uint8_t x = (uint8_t)u; memcpy(slot, &x, 1); }
        else if (code == 'H') { uint16_t x = (uint16_t)u; memcpy(slot, &x, 2); }
        else if (code == 'I') { uint32_t x = (uint32_t)u; memcpy(slot, &x, 4); }
        else memcpy(slot, &u, 8);
        break;
    }
    default: {
        long long x = PyLong_AsLongLong(v);
        if (code == 'b') { int8_t y = (int8_t)x; memcpy(slot, &y, 1); }
        else if (code == 'h') { int16_t y = (int16_t)x; memcpy(slot, &y, 2); }
        else if (code == 'i') { int32_t y = (int32_t)x; memcpy(slot, &y, 4); }
        else memcpy(slot, &x, 8);
    }
    }
    return PyErr_Occurred() ? -1 : 0;
}

/* Packs ``n`` arguments (then ``trailing``) by ``types`` and launches; 0, or -1 with an exception
 * (``failed``: called with the driver's error code, to raise; NULL: a RuntimeError). */
static int driver_launch(driver_launch_t launch_fn, void *fn, const unsigned grid[3], const unsigned block[3],
                         unsigned shared, PyObject *stream, const char *types, PyObject *const *kargs,
                         Py_ssize_t n, PyObject *trailing, PyObject *failed) {
    uint64_t buf[MAX_STACK];
    void *params[MAX_STACK];
    Py_ssize_t nt = trailing ? PyTuple_GET_SIZE(trailing) : 0;
    if (n + nt > MAX_STACK || (Py_ssize_t)strlen(types) != n + nt) {
        PyErr_SetString(PyExc_ValueError, "one type code per kernel argument");
        return -1;
    }
    for (Py_ssize_t k = 0; k < n + nt; k++) {
        if (pack(types[k], k < n ? kargs[k] : PyTuple_GET_ITEM(trailing, k - n), &buf[k]) < 0) return -1;
        params[k] = &buf[k];
    }
    void *s = PyLong_AsVoidPtr(stream);
    if (PyErr_Occurred()) return -1;
    int rc = launch_fn(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], shared, s, params, NULL);
    if (rc != 0) {
        if (failed) {
            PyObject *code = PyLong_FromLong(rc);
            if (!code) return -1;
            PyObject *r = PyObject_CallOneArg(failed, code);  /* raises LaunchError */
            Py_DECREF(code);
            if (!r) return -1;
            Py_DECREF(r);
        }
        PyErr_Format(PyExc_RuntimeError, "kernel launch failed with driver error %d", rc);
        return -1;
    }
    return 0;
}

static int driver_call(const LaunchRec *l, PyObject *stream, PyObject *const *kargs) {
    if (!l->scratch_alloc)
        return driver_launch(l->launch_fn, l->fn_handle, l->grid, l->block, l->shared, stream, l->types, kargs,
                             l->nslots, l->trailing, l->failed);
    /* the first trailing parameter is a buffer made for this launch */
    int rc = -1;
    PyObject *nbytes = NULL, *buf = NULL, *addr = NULL, *trailing = NULL;
    if (!(nbytes = PyLong_FromUnsignedLongLong(l->scratch_bytes)) ||
        !(buf = PyObject_CallOneArg(l->scratch_alloc, nbytes)) ||
        !(addr = PyObject_CallMethodNoArgs(buf, s_data_ptr)) ||
        !(trailing = PyTuple_New(PyTuple_GET_SIZE(l->trailing))))
        goto done;
    PyTuple_SET_ITEM(trailing, 0, Py_NewRef(addr));
    for (Py_ssize_t i = 1; i < PyTuple_GET_SIZE(l->trailing); i++)
        PyTuple_SET_ITEM(trailing, i, Py_NewRef(PyTuple_GET_ITEM(l->trailing, i)));
    rc = driver_launch(l->launch_fn, l->fn_handle, l->grid, l->block, l->shared, stream, l->types, kargs,
                       l->nslots, trailing, l->failed);
done:
    Py_XDECREF(nbytes); Py_XDECREF(addr); Py_XDECREF(trailing);
    Py_XDECREF(buf);  /* freed to the caching allocator after the launch is queued on this stream */
    return rc;
}

static PyObject *Fire_new(PyTypeObject *type, PyObject *args, PyObject *kw);

static inline int scalar_ok(PyObject *v, const Slot *s) {
    double d;
    if (s->is_int) {
        if (!PyLong_CheckExact(v)) return 0;
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) return 0;
        d = (double)x;
    } else {
        if (!PyFloat_CheckExact(v)) return 0;
        d = PyFloat_AS_DOUBLE(v);
        if (!isfinite(d)) return 0;
    }
    return s->lo <= d && d <= s->hi;
}

/* Runs one launch; 0 on success, -1 with an exception set. */
static int run_launch(const LaunchRec *l, PyObject *args) {
    PyObject *stack[MAX_STACK];
    PyObject *owned[MAX_STACK];
    Py_ssize_t nowned = 0, n = 0, nargs = PyTuple_GET_SIZE(args);
    PyObject *checked = NULL;
    int rc = -1;
    uint64_t acc = 0;

    PyObject *stream = PyObject_CallOneArg(l->stream_fn, l->device);
    if (!stream) return -1;
    owned[nowned++] = stream;
    stack[n++] = l->gx; stack[n++] = l->gy; stack[n++] = l->gz;
    stack[n++] = stream; stack[n++] = l->function;
    for (Py_ssize_t i = 0; i < l->nfixed; i++) stack[n++] = PyTuple_GET_ITEM(l->fixed, i);
    Py_ssize_t scalar_no = 0;
    for (Py_ssize_t k = 0; k < l->nslots; k++) {
        const Slot *s = &l->slots[k];
        if (s->kind == SLOT_C) {
            stack[n++] = s->value;
            continue;
        }
        if (s->index >= nargs) {
            PyErr_SetString(PyExc_IndexError, "jitkern fast path: argument position out of range");
            goto done;
        }
        PyObject *a = PyTuple_GET_ITEM(args, s->index);
        if (s->kind == SLOT_T) {
            unsigned long long u;
            PyObject *p = g_sig && g_sig->data_ptr(a, &u) == 0 ? PyLong_FromUnsignedLongLong(u)
                                                                : PyObject_CallMethodNoArgs(a, s_data_ptr);
            if (!p) goto done;
            owned[nowned++] = p;
            acc |= PyLong_AsUnsignedLongLong(p);
            if (PyErr_Occurred()) goto done;
            stack[n++] = p;
        } else {  /* scalar */
            if (!checked && !scalar_ok(a, s)) {
                checked = PyObject_CallOneArg(l->check, args);  /* raises for a bad value */
                if (!checked) goto done;
                PyObject *seq = PySequence_Tuple(checked);
                Py_DECREF(checked);
                if (!seq) goto done;
                checked = seq;
                if (PyTuple_GET_SIZE(checked) != l->nscalars) {
                    PyErr_SetString(PyExc_RuntimeError, "jitkern fast path: scalar check returned a wrong count");
                    goto done;
                }
            }
            stack[n++] = checked ? PyTuple_GET_ITEM(checked, scalar_no) : a;
            scalar_no++;
        }
    }
    if (acc & 15) {
        PyObject *r = PyObject_CallOneArg(l->misaligned, args);  /* raises LayoutError */
        if (r) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_RuntimeError, "jitkern fast path: a tensor is not 16-byte aligned");
        }
        goto done;
    }
    /* scalars before the first non-exact one were put on the stack as given: redo them converted */
    if (checked) {
        Py_ssize_t j = 0, m = 5 + l->nfixed;
        for (Py_ssize_t k = 0; k < l->nslots; k++, m++)
            if (l->slots[k].kind == SLOT_S) stack[m] = PyTuple_GET_ITEM(checked, j++);
    }
    if (l->how == HOW_DRIVER) {
        if (driver_call(l, stream, stack + 5 + l->nfixed) < 0) goto done;
    } else {
        PyObject *r = PyObject_Vectorcall(l->c_launch, stack, n, NULL);
        if (!r) goto done;
        Py_DECREF(r);
    }
    rc = 0;
done:
    for (Py_ssize_t i = 0; i < nowned; i++) Py_DECREF(owned[i]);
    Py_XDECREF(checked);
    return rc;
}

static PyObject *fire_run(Fire *self, PyObject *args) {
    PyObject *full = args;
    if (self->prepare != Py_None) {
        full = PyObject_CallOneArg(self->prepare, args);
        if (!full) return NULL;
        if (!PyTuple_Check(full)) {
            Py_DECREF(full);
            PyErr_SetString(PyExc_TypeError, "prepare(args) must return a tuple");
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < self->nlaunch; i++) {
        if (run_launch(&self->launches[i], full) < 0) {
            if (full != args) Py_DECREF(full);
            return NULL;
        }
    }
    if (full != args) Py_DECREF(full);
    return Py_NewRef(self->name);
}

static PyObject *Fire_vectorcall(PyObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != 1 || (kwnames && PyTuple_GET_SIZE(kwnames)) || !PyTuple_Check(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "Fire takes one argument: the op's argument tuple");
        return NULL;
    }
    return fire_run((Fire *)self, argv[0]);
}

static PyObject *Fire_get_name(Fire *self, void *closure) { return Py_NewRef(self->name); }

static PyGetSetDef Fire_getset[] = {
    {"name", (getter)Fire_get_name, NULL, "the candidate's name, which a call returns", NULL},
    {NULL}
};

static PyTypeObject FireType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "jitkern_fastcall.Fire",
    .tp_basicsize = sizeof(Fire),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A decided candidate's launches, run in C: Fire(name, launches, prepare)(args) -> name",
    .tp_new = Fire_new,
    .tp_dealloc = (destructor)Fire_dealloc,
    .tp_traverse = (traverseproc)Fire_traverse,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Fire, vectorcall),
    .tp_getset = Fire_getset,
};

static PyObject *Fire_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *name, *launches, *prepare;
    if (!PyArg_ParseTuple(args, "OOO", &name, &launches, &prepare)) return NULL;
    PyObject *seq = PySequence_Fast(launches, "launches must be a sequence");
    if (!seq) return NULL;
    Fire *self = (Fire *)type->tp_alloc(type, 0);
    if (!self) { Py_DECREF(seq); return NULL; }
    self->vectorcall = Fire_vectorcall;
    self->name = Py_NewRef(name);
    self->prepare = Py_NewRef(prepare);
    self->nlaunch = PySequence_Fast_GET_SIZE(seq);
    self->launches = PyMem_Calloc(self->nlaunch ? self->nlaunch : 1, sizeof(LaunchRec));
    if (!self->launches) { Py_DECREF(seq); Py_DECREF(self); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < self->nlaunch; i++) {
        if (parse_launch(PySequence_Fast_GET_ITEM(seq, i), &self->launches[i]) < 0) {
            Py_DECREF(seq);
            Py_DECREF(self);
            return NULL;
        }
    }
    Py_DECREF(seq);
    return (PyObject *)self;
}

/* ------------------------------------------------------------------------------ Dispatch */

typedef struct {
    PyObject_HEAD
    Py_ssize_t *tensors, ntensors, *statics, nstatics;
    PyObject *memo, *slow, *fast;
    vectorcallfunc vectorcall;
} Dispatch;

/* The compact signature: one bytes object of words read from the TensorImpls (per tensor position
 * the tensor's type, then torchsig's words; -1 for None), in a tuple with the static arguments if
 * there are any. It tells apart at least what the Python key does. NULL without an exception: some
 * argument is not a plain tensor (the Python key is used); NULL with one: out of memory. */
static PyObject *compact_key(Dispatch *d, PyObject *args) {
    long long w[SIG_WORDS];
    Py_ssize_t n = 0, nargs = PyTuple_GET_SIZE(args);
    for (Py_ssize_t k = 0; k < d->ntensors; k++) {
        Py_ssize_t i = d->tensors[k];
        if (i >= nargs || n + 1 >= SIG_WORDS) return NULL;
        PyObject *t = PyTuple_GET_ITEM(args, i);
        if (t == Py_None) {
            w[n++] = -1;
            continue;
        }
        w[n++] = (long long)(intptr_t)Py_TYPE(t);
        Py_ssize_t m = g_sig->words(t, w + n, SIG_WORDS - n);
        if (m < 0) return NULL;
        n += m;
    }
    PyObject *blob = PyBytes_FromStringAndSize((const char *)w, n * (Py_ssize_t)sizeof(long long));
    if (!blob || !d->nstatics) return blob;
    PyObject *key = PyTuple_New(1 + d->nstatics);
    if (!key) { Py_DECREF(blob); return NULL; }
    PyTuple_SET_ITEM(key, 0, blob);
    for (Py_ssize_t k = 0; k < d->nstatics; k++) {
        Py_ssize_t i = d->statics[k];
        if (i >= nargs) { Py_DECREF(key); return NULL; }
        PyTuple_SET_ITEM(key, 1 + k, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    }
    return key;
}

/* The call signature, or NULL with an exception (AttributeError/TypeError/IndexError: not keyable). */
static PyObject *make_key(Dispatch *d, PyObject *args) {
    Py_ssize_t nargs = PyTuple_GET_SIZE(args);
    PyObject *key = PyTuple_New(d->ntensors + d->nstatics);
    if (!key) return NULL;
    for (Py_ssize_t k = 0; k < d->ntensors; k++) {
        Py_ssize_t i = d->tensors[k];
        if (i >= nargs) { PyErr_SetString(PyExc_IndexError, "too few arguments"); goto fail; }
        PyObject *t = PyTuple_GET_ITEM(args, i);
        if (t == Py_None) {
            PyTuple_SET_ITEM(key, k, Py_NewRef(Py_None));
            continue;
        }
        PyObject *item = PyTuple_New(5);
        if (!item) goto fail;
        PyTuple_SET_ITEM(key, k, item);
        PyObject *v;
        PyTuple_SET_ITEM(item, 0, Py_NewRef((PyObject *)Py_TYPE(t)));
        if (!(v = PyObject_GetAttr(t, s_shape))) goto fail;
        PyTuple_SET_ITEM(item, 1, v);
        if (!(v = PyObject_CallMethodNoArgs(t, s_stride))) goto fail;
        PyTuple_SET_ITEM(item, 2, v);
        if (!(v = PyObject_GetAttr(t, s_dtype))) goto fail;
        PyTuple_SET_ITEM(item, 3, v);
        if (!(v = PyObject_GetAttr(t, s_device))) goto fail;
        PyTuple_SET_ITEM(item, 4, v);
    }
    for (Py_ssize_t k = 0; k < d->nstatics; k++) {
        Py_ssize_t i = d->statics[k];
        if (i >= nargs) { PyErr_SetString(PyExc_IndexError, "too few arguments"); goto fail; }
        PyTuple_SET_ITEM(key, d->ntensors + k, Py_NewRef(PyTuple_GET_ITEM(args, i)));
    }
    return key;
fail:
    Py_DECREF(key);
    return NULL;
}

/* Runs what ``route`` (a memo value, borrowed) says for ``args``. */
static PyObject *run_route(PyObject *route, PyObject *args) {
    if (route == Py_None) Py_RETURN_NONE;
    Py_INCREF(route);  /* the memo may change while it runs */
    PyObject *r = Py_IS_TYPE(route, &FireType) ? fire_run((Fire *)route, args) : PyObject_CallOneArg(route, args);
    Py_DECREF(route);
    return r;
}

static PyObject *dispatch_run(Dispatch *d, PyObject *args) {
    /* first the compact key's cache (``fast``: compact key -> memo value, emptied by the Python
     * side whenever the memo changes), then the memo under the Python key */
    PyObject *ck = NULL, *route = NULL;
    if (g_sig && d->fast != Py_None) {
        ck = compact_key(d, args);
        if (ck) {
            route = PyDict_GetItemWithError(d->fast, ck);  /* borrowed */
            if (route) {
                Py_DECREF(ck);
                return run_route(route, args);
            }
            if (PyErr_Occurred()) {  /* an unhashable static argument: the Python key says the rest */
                PyErr_Clear();
                Py_CLEAR(ck);
            }
        } else if (PyErr_Occurred()) {
            return NULL;
        }
    }
    PyObject *key = make_key(d, args);
    if (key) {
        route = PyDict_GetItemWithError(d->memo, key);  /* borrowed; hashing may raise (unhashable) */
        Py_DECREF(key);
    }
    if (!route) {
        Py_XDECREF(ck);
        if (PyErr_Occurred()) {
            if (!(PyErr_ExceptionMatches(PyExc_AttributeError) || PyErr_ExceptionMatches(PyExc_TypeError) ||
                  PyErr_ExceptionMatches(PyExc_IndexError)))
                return NULL;
            PyErr_Clear();
        }
        return PyObject_CallOneArg(d->slow, args);
    }
    if (ck) {
        int rc = PyDict_SetItem(d->fast, ck, route);
        Py_DECREF(ck);
        if (rc < 0) return NULL;
    }
    return run_route(route, args);
}

static PyObject *Dispatch_vectorcall(PyObject *self, PyObject *const *argv, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    if (n != 1 || (kwnames && PyTuple_GET_SIZE(kwnames)) || !PyTuple_Check(argv[0])) {
        PyErr_SetString(PyExc_TypeError, "Dispatch takes one argument: the op's argument tuple");
        return NULL;
    }
    return dispatch_run((Dispatch *)self, argv[0]);
}

static Py_ssize_t *positions(PyObject *seq_in, Py_ssize_t *count) {
    PyObject *seq = PySequence_Fast(seq_in, "positions must be a sequence");
    if (!seq) return NULL;
    *count = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t *out = PyMem_Calloc(*count ? *count : 1, sizeof(Py_ssize_t));
    if (!out) { Py_DECREF(seq); PyErr_NoMemory(); return NULL; }
    for (Py_ssize_t i = 0; i < *count; i++) {
        out[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (out[i] < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "negative position");
            PyMem_Free(out);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    return out;
}

static void Dispatch_dealloc(Dispatch *self) {
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->memo);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->fast);
    PyMem_Free(self->tensors);
    PyMem_Free(self->statics);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Dispatch_traverse(Dispatch *self, visitproc visit, void *arg) {
    Py_VISIT(self->memo);
    Py_VISIT(self->slow);
    Py_VISIT(self->fast);
    return 0;
}

static PyObject *Dispatch_key(Dispatch *self, PyObject *args) {
    if (!PyTuple_Check(args)) {
        PyErr_SetString(PyExc_TypeError, "key(args): args must be a tuple");
        return NULL;
    }
    return make_key(self, args);
}

static PyMethodDef Dispatch_methods[] = {
    {"key", (PyCFunction)Dispatch_key, METH_O, "key(args): the call signature, as the memo holds it"},
    {NULL}
};

static PyObject *Dispatch_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *tensors, *statics, *memo, *slow, *fast = Py_None;
    if (!PyArg_ParseTuple(args, "OOO!O|O", &tensors, &statics, &PyDict_Type, &memo, &slow, &fast)) return NULL;
    if (fast != Py_None && !PyDict_CheckExact(fast)) {
        PyErr_SetString(PyExc_TypeError, "Dispatch: fast must be a dict or None");
        return NULL;
    }
    Dispatch *self = (Dispatch *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->vectorcall = Dispatch_vectorcall;
    self->memo = Py_NewRef(memo);
    self->slow = Py_NewRef(slow);
    self->fast = Py_NewRef(fast);
    if (!(self->tensors = positions(tensors, &self->ntensors)) ||
        !(self->statics = positions(statics, &self->nstatics))) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyTypeObject DispatchType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "jitkern_fastcall.Dispatch",
    .tp_basicsize = sizeof(Dispatch),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "Signature, memo lookup and the decided launches in C: Dispatch(tensors, statics, memo, slow, fast=None)(args)",
    .tp_new = Dispatch_new,
    .tp_dealloc = (destructor)Dispatch_dealloc,
    .tp_traverse = (traverseproc)Dispatch_traverse,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Dispatch, vectorcall),
    .tp_methods = Dispatch_methods,
};

/* ------------------------------------------------------------------------- the CUDA driver */

typedef int (*cu_i_t)(int);
typedef int (*cu_get_current_t)(void **);
typedef int (*cu_ctx_retain_t)(void **, int);
typedef int (*cu_ctx_set_t)(void *);
typedef int (*cu_device_get_t)(int *, int);
typedef int (*cu_device_attr_t)(int *, int, int);
typedef int (*cu_load_data_t)(void **, const void *);
typedef int (*cu_get_function_t)(void **, void *, const char *);
typedef int (*cu_func_get_attr_t)(int *, int, void *);
typedef int (*cu_func_set_attr_t)(void *, int, int);
typedef int (*cu_func_cache_t)(void *, int);
typedef int (*cu_error_string_t)(int, const char **);

/* the few CUDA driver enum values used (cuda.h; stable across CUDA releases) */
enum {
    FUNC_MAX_THREADS_PER_BLOCK = 0, FUNC_SHARED_SIZE_BYTES = 1, FUNC_LOCAL_SIZE_BYTES = 3, FUNC_NUM_REGS = 4,
    FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8, DEV_MAX_SHARED_PER_SM = 81, DEV_MAX_SHARED_PER_BLOCK_OPTIN = 97,
    FUNC_CACHE_PREFER_SHARED = 1,
};

static struct {
    int ready;
    cu_get_current_t ctx_get_current;
    cu_ctx_retain_t primary_ctx_retain;
    cu_ctx_set_t ctx_set_current;
    cu_device_get_t device_get;
    cu_device_attr_t device_attr;
    cu_load_data_t module_load_data;
    cu_get_function_t module_get_function;
    cu_func_get_attr_t func_get_attr;
    cu_func_set_attr_t func_set_attr;
    cu_func_cache_t func_set_cache;
    cu_error_string_t error_string;
    driver_launch_t launch_kernel;
} cu;

static int cu_open(void) {
    if (cu.ready) return 0;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (!lib) {
        PyErr_Format(PyExc_OSError, "cannot open libcuda.so.1 (%s)", dlerror());
        return -1;
    }
#define SYM(field, name) if (!(*(void **)&cu.field = dlsym(lib, name))) { \
        PyErr_Format(PyExc_OSError, "libcuda.so.1 has no %s", name); return -1; }
    SYM(ctx_get_current, "cuCtxGetCurrent") SYM(primary_ctx_retain, "cuDevicePrimaryCtxRetain")
    SYM(ctx_set_current, "cuCtxSetCurrent") SYM(device_get, "cuDeviceGet")
    SYM(device_attr, "cuDeviceGetAttribute") SYM(module_load_data, "cuModuleLoadData")
    SYM(module_get_function, "cuModuleGetFunction") SYM(func_get_attr, "cuFuncGetAttribute")
    SYM(func_set_attr, "cuFuncSetAttribute") SYM(func_set_cache, "cuFuncSetCacheConfig")
    SYM(error_string, "cuGetErrorString") SYM(launch_kernel, "cuLaunchKernel")
#undef SYM
    cu.ready = 1;
    return 0;
}

static int cu_check(int rc, const char *what) {
    if (rc == 0) return 0;
    const char *text = NULL;
    if (cu.error_string) cu.error_string(rc, &text);
    PyErr_Format(PyExc_RuntimeError, "%s failed: CUDA error %d (%s)", what, rc, text ? text : "unknown");
    return -1;
}

static PyObject *fc_load_cubin(PyObject *self, PyObject *args) {
    Py_buffer image;
    const char *name;
    int shared, ordinal;
    if (!PyArg_ParseTuple(args, "y*sii", &image, &name, &shared, &ordinal)) return NULL;
    if (cu_open() < 0) { PyBuffer_Release(&image); return NULL; }
    void *ctx = NULL, *mod = NULL, *fn = NULL;
    int dev, n_regs = 0, n_spills = 0, max_threads = 0, optin = 0, ok = 0;
    /* the module goes into the current context, or the device's primary one (torch's) if none */
    if (cu_check(cu.ctx_get_current(&ctx), "cuCtxGetCurrent") < 0) goto done;
    if (cu_check(cu.device_get(&dev, ordinal), "cuDeviceGet") < 0) goto done;
    if (!ctx) {
        if (cu_check(cu.primary_ctx_retain(&ctx, dev), "cuDevicePrimaryCtxRetain") < 0 ||
            cu_check(cu.ctx_set_current(ctx), "cuCtxSetCurrent") < 0)
            goto done;
    }
    if (cu_check(cu.module_load_data(&mod, image.buf), "cuModuleLoadData") < 0 ||
        cu_check(cu.module_get_function(&fn, mod, name), "cuModuleGetFunction") < 0 ||
        cu_check(cu.func_get_attr(&n_regs, FUNC_NUM_REGS, fn), "cuFuncGetAttribute") < 0 ||
        cu_check(cu.func_get_attr(&n_spills, FUNC_LOCAL_SIZE_BYTES, fn), "cuFuncGetAttribute") < 0 ||
        cu_check(cu.func_get_attr(&max_threads, FUNC_MAX_THREADS_PER_BLOCK, fn), "cuFuncGetAttribute") < 0 ||
        cu_check(cu.device_attr(&optin, DEV_MAX_SHARED_PER_BLOCK_OPTIN, dev), "cuDeviceGetAttribute") < 0)
        goto done;
    if (shared > optin) {
        PyErr_Format(PyExc_ValueError, "the kernel needs %d bytes of shared memory; this device allows %d per block",
                     shared, optin);
        goto done;
    }
    if (shared > 49152 && optin > 49152) {  /* opt in to more than 48 KiB of dynamic shared memory */
        int shared_static = 0;
        if (cu_check(cu.func_set_cache(fn, FUNC_CACHE_PREFER_SHARED), "cuFuncSetCacheConfig") < 0 ||
            cu_check(cu.func_get_attr(&shared_static, FUNC_SHARED_SIZE_BYTES, fn), "cuFuncGetAttribute") < 0 ||
            cu_check(cu.func_set_attr(fn, FUNC_MAX_DYNAMIC_SHARED_SIZE_BYTES, optin - shared_static),
                     "cuFuncSetAttribute") < 0)
            goto done;
    }
    ok = 1;
done:
    PyBuffer_Release(&image);
    if (!ok) return NULL;
    return Py_BuildValue("(Kiii)", (unsigned long long)(uintptr_t)fn, n_regs, n_spills / 4, max_threads);
}

static PyObject *fc_cu_launch_kernel(PyObject *self, PyObject *unused) {
    if (cu_open() < 0) return NULL;
    return PyLong_FromVoidPtr((void *)cu.launch_kernel);
}

static PyObject *fc_launch(PyObject *self, PyObject *args) {
    PyObject *fn_addr, *function, *grid, *block, *stream, *kargs;
    unsigned shared, g[3], b[3];
    const char *types;
    if (!PyArg_ParseTuple(args, "OOOOIOsO!", &fn_addr, &function, &grid, &block, &shared, &stream, &types,
                          &PyTuple_Type, &kargs))
        return NULL;
    if (parse_dims(grid, g, "grid") < 0 || parse_dims(block, b, "block") < 0) return NULL;
    driver_launch_t launch_fn = (driver_launch_t)PyLong_AsVoidPtr(fn_addr);
    void *fn = PyLong_AsVoidPtr(function);
    if (PyErr_Occurred()) return NULL;
    if (!launch_fn) { PyErr_SetString(PyExc_ValueError, "no launch function"); return NULL; }
    if (driver_launch(launch_fn, fn, g, b, shared, stream, types, &PyTuple_GET_ITEM(kargs, 0),
                      PyTuple_GET_SIZE(kargs), NULL, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *fc_use_torch(PyObject *self, PyObject *cap) {
    if (cap == Py_None) {  /* back to the Python attributes */
        g_sig = NULL;
        Py_RETURN_NONE;
    }
    const TorchSig *sig = PyCapsule_GetPointer(cap, "jitkern_torchsig.api");
    if (!sig) return NULL;
    if (sig->version != 1 || !sig->words || !sig->data_ptr) {
        PyErr_SetString(PyExc_ValueError, "use_torch: a jitkern_torchsig of another version");
        return NULL;
    }
    g_sig = sig;  /* the capsule's module stays imported (sys.modules) for the process's life */
    Py_RETURN_NONE;
}

static PyObject *fc_compact_key(PyObject *self, PyObject *args) {
    PyObject *d, *a;
    if (!PyArg_ParseTuple(args, "O!O!", &DispatchType, &d, &PyTuple_Type, &a)) return NULL;
    if (!g_sig) Py_RETURN_NONE;
    PyObject *k = compact_key((Dispatch *)d, a);
    if (!k && !PyErr_Occurred()) Py_RETURN_NONE;
    return k;
}

static PyMethodDef module_methods[] = {
    {"use_torch", fc_use_torch, METH_O,
     "use_torch(capsule): read tensors through jitkern_torchsig's api (None: through Python attributes)"},
    {"compact_key", fc_compact_key, METH_VARARGS,
     "compact_key(dispatch, args): the signature as the fast cache holds it, or None (Python key only)"},
    {"load_cubin", fc_load_cubin, METH_VARARGS,
     "load_cubin(image, name, shared, device) -> (function, n_regs, n_spills, max_threads)"},
    {"cu_launch_kernel", fc_cu_launch_kernel, METH_NOARGS, "the address of the driver's cuLaunchKernel"},
    {"launch", fc_launch, METH_VARARGS, "launch(launch_fn, function, grid, block, shared, stream, types, args)"},
    {NULL}
};

/* -------------------------------------------------------------------------------- module */

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "jitkern_fastcall",
                                    "jitkern's dispatch hot path (see jitkern/fastcall.py)", -1, module_methods};

PyMODINIT_FUNC PyInit_jitkern_fastcall(void) {
    if (PyType_Ready(&FireType) < 0 || PyType_Ready(&DispatchType) < 0) return NULL;
    if (!(s_shape = PyUnicode_InternFromString("shape")) || !(s_stride = PyUnicode_InternFromString("stride")) ||
        !(s_dtype = PyUnicode_InternFromString("dtype")) || !(s_device = PyUnicode_InternFromString("device")) ||
        !(s_data_ptr = PyUnicode_InternFromString("data_ptr")))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    Py_INCREF(&FireType);
    Py_INCREF(&DispatchType);
    if (PyModule_AddObject(m, "Fire", (PyObject *)&FireType) < 0 ||
        PyModule_AddObject(m, "Dispatch", (PyObject *)&DispatchType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
