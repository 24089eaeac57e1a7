// The Python module object behind `import dupfast._C`. The ops themselves are registered with
// the torch dispatcher (TORCH_LIBRARY_FRAGMENT in each op's .cpp) and called as torch.ops.dupfast.*;
// this file only makes the shared object importable, without pybind11 or torch/extension.h.
#include <Python.h>

static struct PyModuleDef dupfast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&dupfast_c_module); }
