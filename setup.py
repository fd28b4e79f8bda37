"""Build of fastnlg's native layer.

- ``fastnlg._C``: C++ CPU kernels from csrc/cpu (pybind11, OpenMP). Always built.
- ``fastnlg._C_cuda``: CUDA kernels from csrc/cuda, only when FASTNLG_BUILD_CUDA=1 and nvcc exists.
- The Triton sources in top-level ``kernels/`` install as ``fastnlg.kernels`` (a top-level ``kernels``
  module would shadow Hugging Face's package of that name, which bitsandbytes imports), and the benchmark
  suite in ``benchmarks/`` as ``fastnlg.benchmarks`` (``fastnlg bench`` runs from an installed package).

Native functions take raw pointers and sizes; no torch headers are needed to build them, so the build
environment never pulls a torch wheel.
"""
import glob
import os
import shutil
import subprocess

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext, naive_recompile
from setuptools import setup

# The C++ sources compile in parallel (FASTNLG_BUILD_JOBS, default: every core), and a rebuild in the same
# build folder recompiles only the sources newer than their objects.
ParallelCompile("FASTNLG_BUILD_JOBS", needs_recompile=naive_recompile).install()

# The GPUs we target, T4 / RTX 20 (sm_75) to RTX 50 (sm_120); FASTNLG_CUDA_ARCHS="90" builds for fewer (the
# GPU smoke run builds for the GPU at hand only). scripts/check_nvcc.sh compiles the same list in CI.
CUDA_ARCHS = tuple(os.environ.get("FASTNLG_CUDA_ARCHS", "75 80 86 89 90 120").split())


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
    # nvcc may be a wrapper script: its dry run names the include folder it really uses
    dry = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True).stderr
    found = [line.split('INCLUDES="-I', 1)[1].split('"', 1)[0] for line in dry.splitlines() if 'INCLUDES="-I' in line]
    cuda_include = os.path.normpath(found[0]) if found else os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"),
                                                                        "include")
    cuda_libs = [os.path.normpath(os.path.join(cuda_include, "..", d)) for d in ("lib", "lib64")]
    extensions.append(
        Pybind11Extension(
            "fastnlg._C_cuda",
            ["csrc/cuda/bindings_cuda.cpp"],
            include_dirs=[cuda_include, "csrc/cuda"],
            library_dirs=[d for d in cuda_libs if os.path.isdir(d)],
            cxx_std=17,
        )
    )

setup(
    packages=["fastnlg", "fastnlg.ops", "fastnlg.nn", "fastnlg.quant", "fastnlg.patching", "fastnlg.train",
              "fastnlg.kernels", "fastnlg.benchmarks"],
    package_dir={"fastnlg.kernels": "kernels", "fastnlg.benchmarks": "benchmarks"},
    ext_modules=extensions,
    cmdclass={"build_ext": BuildExtWithCuda},
)
