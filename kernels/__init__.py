"""fastnlg's Triton kernels, installed as ``fastnlg.kernels`` (setup.py maps this folder there).

This folder must never be importable as a top-level ``kernels``: Hugging Face has a package of that name,
which bitsandbytes and Transformers look for, and any Python started from the repository root (pytest,
``python -m``) has the root on sys.path. When this file runs as ``kernels``, it hands the name over to the
``kernels`` that the rest of sys.path holds (Hugging Face's, if installed). Where there is none, it leaves an
empty module without ``__file__``, which is what Transformers' availability check reads as "not installed"
(raising instead would break that check, which finds this folder before importing it); bitsandbytes' `from
kernels import get_kernel` then fails with ImportError as it does without the package. The import machinery
returns the module left in sys.modules, so nothing sees this folder under that name.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys
    import types

    _here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _rest)
    if _spec is None:
        _stub = types.ModuleType("kernels", "Hugging Face's kernels package is not installed")
        # a spec, so that a later importlib.util.find_spec("kernels") (Transformers asks again whenever its
        # cached check is called with other arguments) returns it instead of raising "__spec__ is None"
        _stub.__spec__ = importlib.machinery.ModuleSpec("kernels", None)
        sys.modules["kernels"] = _stub
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        try:
            _spec.loader.exec_module(_module)
        except BaseException:
            del sys.modules["kernels"]
            raise
