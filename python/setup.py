"""Builds ksa_torch: the ksa kernels through their CMake build (static libraries ksa_core, ksa_cpu and, with a
CUDA torch, ksa_cuda), then the binding ksa_torch._C against the installed torch with torch's BuildExtension.

    pip install --no-build-isolation ./python        # or -e for an editable install; see docs/torch.md

--no-build-isolation: the binding must be compiled against the torch that will import it, so the build uses
the environment's torch instead of fetching one into an isolated build environment.

Environment:
  KSA_SOURCE_DIR   the ksa source tree (default: the folder above this file)
  KSA_BUILD_DIR    an existing CMake build of that tree whose libraries to link (its targets are brought up to
                   date); default: a Release build of the kernels only, under setuptools' build_temp
  KSA_TORCH_CUDA   1 / 0: build with / without the CUDA kernels (default: when torch has CUDA and nvcc exists)
  KSA_CMAKE_ARGS   extra arguments for the CMake configure, e.g. -DCMAKE_CUDA_ARCHITECTURES=90
  MAX_JOBS         parallel compile jobs (default: all cores)
"""
import os
import pathlib
import re
import shlex
import subprocess
import sys

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
os.chdir(HERE)  # the extension's source paths are relative to this folder, wherever pip or a user runs from


def fail(msg):
    sys.stderr.write(f"\nksa_torch build: {msg}\n\n")
    sys.exit(1)


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as e:
    fail(f"torch is not importable here ({e}). ksa_torch compiles against the installed torch: install torch "
         "first, then build without an isolated environment: pip install --no-build-isolation ./python")


def source_dir():
    src = pathlib.Path(os.environ.get("KSA_SOURCE_DIR", HERE.parent)).resolve()
    if not (src / "CMakeLists.txt").is_file() or not (src / "include/ksa/attention.hpp").is_file():
        fail(f"the ksa C++ sources were not found at {src} (CMakeLists.txt, include/ksa/). Build from the ksa "
             "repository (pip install --no-build-isolation ./python) or set KSA_SOURCE_DIR to it.")
    return src


SRC = source_dir()


def version():
    m = re.search(r"project\(\s*ksa\s+VERSION\s+([0-9.]+)", (SRC / "CMakeLists.txt").read_text())
    if not m:
        fail(f"no `project(ksa VERSION x.y.z)` in {SRC / 'CMakeLists.txt'}")
    return m.group(1)


def want_cuda():
    env = os.environ.get("KSA_TORCH_CUDA")
    if env is not None:
        return env not in ("0", "", "off", "OFF")
    return torch.version.cuda is not None and CUDA_HOME is not None and (pathlib.Path(CUDA_HOME) / "bin/nvcc").exists()


CUDA = want_cuda()
VERSION = version()
ABI = int(torch._C._GLIBCXX_USE_CXX11_ABI)


class BuildKsa(BuildExtension):
    """Runs the CMake build of the kernels, then compiles and links the binding against its libraries."""

    def run(self):
        libs = self.build_kernels()
        deps = self.kernel_dependencies()
        for ext in self.extensions:
            ext.extra_objects = libs + list(ext.extra_objects or [])
            ext.extra_link_args = deps + list(ext.extra_link_args or [])
        super().run()

    def kernel_dependencies(self):
        """The shared libraries the static kernel libraries need (libksa_cpu: Highway, and OpenBLAS where the
        CMake build found it), from the build's CMakeCache.txt; each with an rpath, so that the extension loads
        wherever they live (a prefix given through CMAKE_PREFIX_PATH included)."""
        cache = {}
        for line in (self._build / "CMakeCache.txt").read_text().splitlines():
            if "=" in line and ":" in line.split("=", 1)[0] and not line.startswith(("//", "#")):
                key, value = line.split("=", 1)
                cache[key.split(":", 1)[0]] = value
        args = []
        hwy_dir = cache.get("hwy_DIR", "")
        if hwy_dir and not hwy_dir.endswith("-NOTFOUND"):
            libdir = pathlib.Path(hwy_dir).resolve().parent.parent  # <libdir>/cmake/hwy
            args += [f"-L{libdir}", f"-Wl,-rpath,{libdir}", "-lhwy"]
        blas = cache.get("BLAS_openblas_LIBRARY", "")
        if blas and not blas.endswith("-NOTFOUND"):
            args += [blas, f"-Wl,-rpath,{pathlib.Path(blas).resolve().parent}"]
        return args

    def build_kernels(self):
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        given = os.environ.get("KSA_BUILD_DIR")
        if given:
            build = pathlib.Path(given).resolve()
            if not (build / "CMakeCache.txt").is_file():
                fail(f"KSA_BUILD_DIR={build} is not a configured CMake build (no CMakeCache.txt)")
        else:
            build = pathlib.Path(self.build_temp).resolve() / "ksa-cmake"
            args = ["cmake", "-S", str(SRC), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DKSA_ENGINE=OFF",
                    "-DKSA_BUILD_TESTS=OFF", f"-DKSA_CUDA={'ON' if CUDA else 'OFF'}",
                    # The libraries' std::string must be the one torch was built with.
                    f"-DCMAKE_CXX_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={ABI}"]
            if CUDA:
                args.append(f"-DCMAKE_CUDA_FLAGS=-D_GLIBCXX_USE_CXX11_ABI={ABI}")
                nvcc = pathlib.Path(CUDA_HOME) / "bin/nvcc"
                if nvcc.exists():
                    args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
            args += shlex.split(os.environ.get("KSA_CMAKE_ARGS", ""))
            self.announce(" ".join(args), level=2)
            subprocess.check_call(args)
        self._build = build
        targets = ["ksa_core", "ksa_cpu"] + (["ksa_cuda"] if CUDA else [])
        subprocess.check_call(["cmake", "--build", str(build), "-j", jobs, "--target", *targets])
        libs = [build / f"src/{t[4:]}/lib{t}.a" for t in reversed(targets)]  # dependents first: cuda, cpu, core
        missing = [str(p) for p in libs if not p.is_file()]
        if missing:
            fail(f"the CMake build in {build} did not produce {', '.join(missing)}"
                 + (" (is it configured with CUDA? KSA_TORCH_CUDA=0 builds without)" if CUDA else ""))
        return [str(p) for p in libs]


def loaded_libstdcxx():
    """The libstdc++ shared library this process (which has imported torch) has loaded, or None.

    The binding links it by path. Where the compiler's own `-lstdc++` resolves to the static archive (seen with
    Ubuntu 24.04's g++ 13.3 next to the pip wheel of torch 2.11), the extension would otherwise carry a second
    copy of libstdc++'s iostreams and locales: formatting a number into an error message (TORCH_CHECK) then
    crashed the process instead of raising RuntimeError. Named first on the link line, the shared library
    resolves those symbols and the archive contributes nothing."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


LIBSTDCXX = loaded_libstdcxx()
Extension = CUDAExtension if CUDA else CppExtension
ext = Extension(
    name="ksa_torch._C",
    sources=["ksa_torch/csrc/ops.cpp"],
    include_dirs=[str(SRC / "include")],
    # The version as a bare pp-number (stringified in ops.cpp): no quotes to survive the build tools' quoting.
    define_macros=[("KSA_VERSION_RAW", VERSION)] + ([("KSA_HAVE_CUDA", "1")] if CUDA else []),
    extra_compile_args={"cxx": ["-O2", "-g0", "-std=c++20", "-Wno-deprecated-declarations"], "nvcc": []},
    extra_link_args=[LIBSTDCXX] if LIBSTDCXX else [],
)

setup(
    version=VERSION,
    packages=["ksa_torch", "ksa_train"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildKsa},
    zip_safe=False,
)
