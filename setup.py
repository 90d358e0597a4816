"""pip install . (use --no-build-isolation to build against the torch you have).

Builds the ops library rsir_kernels/librsir_ops.so when a compiler works: the CPU part always,
the CUDA part when torch has CUDA (torch.version.cuda) and nvcc is found, whether or not a
GPU is present. It is a plain shared library of torch ops, not a Python module: no Python
symbols, a RUNPATH to torch's libraries; the package loads it with torch.ops.load_library,
and so can any process that has torch (docs/design.md section 12). No side effects:
no git, no downloads.

If the extension can't be built (no torch at build time, no compiler, a compile error),
the pure-Python package still installs, with a warning: backend "cpp" then says it is
unavailable and why. Set RSIR_REQUIRE_EXT=1 to make a failed build an error instead.
Other knobs: RSIR_NO_CUDA=1 builds the CPU part only; TORCH_CUDA_ARCH_LIST overrides the
default CUDA targets (sm_80 and sm_90, plus PTX for newer GPUs); MAX_JOBS limits ninja.
"""
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
REQUIRE_EXT = os.environ.get("RSIR_REQUIRE_EXT", "0") not in ("", "0")


def _warn(message):
    print(f"warning: rsir_kernels: {message}; installing without the C++ extension "
          "(backend 'cpp' unavailable)", file=sys.stderr)


def _rel(*parts):
    return os.path.join("csrc", *parts)  # setuptools wants paths relative to setup.py


LIBRARY = "rsir_kernels.librsir_ops"  # -> rsir_kernels/librsir_ops.so (rsir_kernels/_library.py finds it)


def _without_python(ext):
    """torch's extension minus libtorch_python: the ops need libtorch alone."""
    ext.libraries = [name for name in ext.libraries if name != "torch_python"]
    return ext


def _extensions():
    """([Extension], BuildExtension class) or ([], None) when torch is not importable."""
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001  (any import failure: build the pure-Python package)
        if REQUIRE_EXT:
            raise
        _warn(f"torch is not importable at build time ({exc}); use pip install --no-build-isolation")
        return [], None

    sources = [_rel("torch", "ops.cpp"), _rel("torch", "library_info.cpp"), _rel("torch", "index_check.cpp"),
               _rel("kernels", "cpu", "dispatch.cpp"), _rel("kernels", "cpu", "kernel_generic.cpp"),
               _rel("kernels", "cpu", "kernel_avx2.cpp"), _rel("kernels", "cpu", "kernel_avx512.cpp"),
               _rel("kernels", "cpu", "kernel_avx512amx.cpp")]
    cxx = ["-O3", "-Wno-psabi"]
    # RUNPATH: torch next to this package in site-packages, else the torch it was built against
    torch_lib = cpp_extension.library_paths()[0]
    link = ["-Wl,--enable-new-dtags", "-Wl,-rpath,$ORIGIN/../torch/lib", f"-Wl,-rpath,{torch_lib}"]
    if sys.platform.startswith("linux"):
        # at::parallel_for runs on torch's OpenMP pool only when the caller is built with OpenMP.
        cxx += ["-fopenmp"]
        link += ["-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
                  extra_link_args=link)
    cpu_ext = _without_python(cpp_extension.CppExtension(LIBRARY, sources, extra_compile_args={"cxx": cxx}, **kwargs))
    # CUDA: from torch's CUDA version and nvcc (torch's CUDA_HOME), never from a GPU being present.
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("RSIR_NO_CUDA", "0") in ("", "0"))
    ext = cpu_ext
    if with_cuda:
        nvcc = ["-O3", "-std=c++17", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
        cuda_sources = [_rel("torch", "ops_cuda.cpp"), _rel("kernels", "cuda", "window_attention.cu")]
        ext = _without_python(cpp_extension.CUDAExtension(
            LIBRARY, sources + cuda_sources,
            define_macros=[("RSIR_WITH_CUDA", None)], extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs))

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension; a failed CUDA build falls back to the CPU part, and a failed
        CPU build warns and leaves the pure-Python package (unless RSIR_REQUIRE_EXT=1)."""

        def run(self):
            try:
                super().run()
                return
            except Exception as exc:  # noqa: BLE001  (CompileError, missing compiler, ...)
                if REQUIRE_EXT:
                    raise
                error = exc
            if self.extensions and self.extensions[0] is not cpu_ext:
                print(f"warning: rsir_kernels: the CUDA build failed ({type(error).__name__}: {error}); "
                      "building the CPU part only", file=sys.stderr)
                self.extensions = [cpu_ext]
                try:
                    super().run()
                    return
                except Exception as exc:  # noqa: BLE001
                    error = exc
            _warn(f"the C++ extension failed to build ({type(error).__name__}: {error})")

    # librsir_ops.so, not librsir_ops.cpython-311-...so: one file name for every reader
    return [ext], BuildExtension.with_options(no_python_abi_suffix=True)


ext_modules, build_ext_cls = _extensions()

setup(
    name="rsir_kernels",
    version="0.1.0",
    description="Fused RS-Win / IR-Win window attention kernels for the RSIR Transformer",
    packages=find_packages(include=["rsir_kernels", "rsir_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"], "timm": ["timm>=1.0", "torchvision"], "train": ["timm>=1.0", "torchvision", "scikit-learn", "tqdm", "matplotlib"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext_cls or _setuptools_build_ext},
)
