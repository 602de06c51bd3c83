// What the C hot path (fastcall.c) reads of a torch tensor, from its C++ TensorImpl instead of
// through Python attributes (built and loaded by jitkern/fastcall.py; see there).
//
// Computing a call signature through the Python C API costs five attribute reads per tensor, three
// of which make new objects (torch.Size, the stride tuple, torch.device): about 0.3 us per tensor.
// Read from the TensorImpl, the same facts cost a few nanoseconds. The module exports one capsule,
// ``api``, holding a ``JitkernTorchSig`` (its layout is repeated in fastcall.c):
//
//   words(t, buf, cap) -> n: the signature words of ``t`` -- ndim, dtype, device type, device index,
//       sizes, strides -- or -1 where ``t`` is not exactly torch.Tensor / torch.nn.Parameter with a
//       strided layout (a subclass may override what Python sees; those take the Python path)
//   data_ptr(t, out) -> 0, or -1 (no exception) where the Python call is needed (it raises properly)
//
// The types are checked by identity, and no exception escapes: anything unusual answers -1 and
// the caller falls back to the Python attributes, which give the same facts (or raise).
#include <Python.h>

#include <torch/csrc/autograd/python_variable.h>

namespace {

struct JitkernTorchSig {
    int version;
    PyTypeObject *tensor_type;
    PyTypeObject *param_type;
    Py_ssize_t (*words)(PyObject *, long long *, Py_ssize_t);
    int (*data_ptr)(PyObject *, unsigned long long *);
};

JitkernTorchSig api = {1, nullptr, nullptr, nullptr, nullptr};

inline bool plain(PyObject *t) {
    PyTypeObject *ty = Py_TYPE(t);
    return ty == api.tensor_type || ty == api.param_type;
}

Py_ssize_t words(PyObject *t, long long *buf, Py_ssize_t cap) {
    if (!plain(t)) return -1;
    try {
        const at::Tensor &x = THPVariable_Unpack(t);
        if (x.layout() != c10::kStrided) return -1;
        auto sizes = x.sizes();
        auto strides = x.strides();
        Py_ssize_t nd = static_cast<Py_ssize_t>(sizes.size());
        if (4 + 2 * nd > cap) return -1;
        c10::Device dev = x.device();
        buf[0] = nd;
        buf[1] = static_cast<long long>(x.scalar_type());
        buf[2] = static_cast<long long>(dev.type());
        buf[3] = dev.index();
        for (Py_ssize_t i = 0; i < nd; i++) {
            buf[4 + i] = sizes[i];
            buf[4 + nd + i] = strides[i];
        }
        return 4 + 2 * nd;
    } catch (...) {
        return -1;
    }
}

int data_ptr(PyObject *t, unsigned long long *out) {
    if (!plain(t)) return -1;
    try {
        const at::Tensor &x = THPVariable_Unpack(t);
        if (x.layout() != c10::kStrided || !x.has_storage()) return -1;
        *out = reinterpret_cast<unsigned long long>(x.const_data_ptr());
        return 0;
    } catch (...) {
        return -1;
    }
}

PyObject *type_of(const char *module, const char *name) {
    PyObject *m = PyImport_ImportModule(module);
    if (!m) return nullptr;
    PyObject *ty = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    if (ty && !PyType_Check(ty)) {
        Py_DECREF(ty);
        PyErr_Format(PyExc_TypeError, "%s.%s is not a type", module, name);
        return nullptr;
    }
    return ty;
}

struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "jitkern_torchsig",
                                 "torch tensor facts for jitkern's C hot path (see jitkern/fastcall.py)", -1,
                                 nullptr};

}  // namespace

PyMODINIT_FUNC PyInit_jitkern_torchsig(void) {
    PyObject *tensor = type_of("torch", "Tensor");
    if (!tensor) return nullptr;
    PyObject *param = type_of("torch.nn", "Parameter");
    if (!param) {
        Py_DECREF(tensor);
        return nullptr;
    }
    api.tensor_type = reinterpret_cast<PyTypeObject *>(tensor);  // kept for the process's life
    api.param_type = reinterpret_cast<PyTypeObject *>(param);
    api.words = words;
    api.data_ptr = data_ptr;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return nullptr;
    PyObject *cap = PyCapsule_New(&api, "jitkern_torchsig.api", nullptr);
    if (!cap || PyModule_AddObject(m, "api", cap) < 0) {
        Py_XDECREF(cap);
        Py_DECREF(m);
        return nullptr;
    }
    return m;
}
