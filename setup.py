"""Build of fastnlg's native layer.

- ``fastnlg._C``: C++ CPU kernels from csrc/cpu (pybind11, OpenMP). Always built.
- ``fastnlg._C_cuda``: CUDA kernels from csrc/cuda, only when FASTNLG_BUILD_CUDA=1 and nvcc exists.
- The Triton sources in top-level ``kernels/`` install as ``fastnlg.kernels`` (a top-level ``kernels``
  module would shadow Hugging Face's package of that name, which bitsandbytes imports).

Native functions take raw pointers and sizes; no torch headers are needed to build them, so the build
environment never pulls a torch wheel.
"""
import glob
import os
import shutil
import subprocess

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CUDA_ARCHS = ("80", "86", "89", "90")


def cpu_extension():
    return Pybind11Extension(
        "fastnlg._C",
        sorted(glob.glob("csrc/cpu/*.cpp")),
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"],
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


class BuildExtWithCuda(build_ext):
    """Compiles csrc/cuda/*.cu with nvcc into objects linked into fastnlg._C_cuda."""

    def build_extension(self, ext):
        if ext.name == "fastnlg._C_cuda":
            nvcc = shutil.which("nvcc")
            objects = []
            os.makedirs(self.build_temp, exist_ok=True)
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS]
            for src in sorted(glob.glob("csrc/cuda/*.cu")):
                obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                subprocess.check_call([nvcc, "-O3", "-std=c++17", "-Xcompiler", "-fPIC", *gencode, "-c", src, "-o", obj])
                objects.append(obj)
            ext.extra_objects = objects
            ext.libraries = ["cudart"]
        super().build_extension(ext)


extensions = [cpu_extension()]
if os.environ.get("FASTNLG_BUILD_CUDA") == "1":
    if shutil.which("nvcc") is None:
        raise RuntimeError("FASTNLG_BUILD_CUDA=1 but nvcc is not on PATH")
    cuda_home = os.path.dirname(os.path.dirname(shutil.which("nvcc")))
    extensions.append(
        Pybind11Extension(
            "fastnlg._C_cuda",
            ["csrc/cuda/bindings_cuda.cpp"],
            include_dirs=[os.path.join(cuda_home, "include")],
            library_dirs=[os.path.join(cuda_home, "lib64")],
            cxx_std=17,
        )
    )

setup(
    packages=["fastnlg", "fastnlg.ops", "fastnlg.nn", "fastnlg.kernels"],
    package_dir={"fastnlg.kernels": "kernels"},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtWithCuda},
)
