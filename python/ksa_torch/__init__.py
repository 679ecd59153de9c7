"""PyTorch op for Kwai Summary Attention (KSA), a thin binding over the ksa C++/CUDA kernels.

Build: first build the C++ libraries with CMake (`cmake -S . -B build && cmake --build build`), then
`import ksa_torch` (with `python/` on PYTHONPATH) compiles the binding once with torch's cpp_extension and
links the static libraries from $KSA_BUILD_DIR (default: <repo>/build).

    out = ksa_torch.attention(q, k, v, k_chunk=8, S=1, W=128)          # q [B, L, Hq, D], k/v [B, L, Hkv, D]
    out, lse = ksa_torch.attention(q, k, v, 8, 1, 128, return_lse=True)

q, k, v are the *stream* (text with S summary tokens after every k text tokens), on CUDA (bf16/f16) or
CPU (f32/bf16). [L, H, D] tensors are accepted too.
"""
import os
import pathlib

import torch
from torch.utils import cpp_extension

_REPO = pathlib.Path(__file__).resolve().parents[2]
_ext = None


def _load():
    global _ext
    if _ext is not None:
        return _ext
    build = pathlib.Path(os.environ.get("KSA_BUILD_DIR", _REPO / "build"))
    libs = []
    cuda = (build / "src/cuda/libksa_cuda.a").exists() and torch.cuda.is_available()
    if cuda:
        libs.append(str(build / "src/cuda/libksa_cuda.a"))
    for name in ("cpu", "core"):
        lib = build / f"src/{name}/libksa_{name}.a"
        if not lib.exists():
            raise RuntimeError(f"ksa_torch: {lib} not found; build the C++ libraries first "
                               f"(cmake -S {_REPO} -B {build} && cmake --build {build})")
        libs.append(str(lib))
    flags = ["-O3", "-std=c++20", "-fopenmp"] + (["-DKSA_HAVE_CUDA=1"] if cuda else [])
    ldflags = libs + ["-fopenmp"] + (["-L" + os.path.join(cpp_extension.CUDA_HOME, "lib64"), "-lcudart"] if cuda else [])
    _ext = cpp_extension.load(
        name="ksa_torch_ext" + ("_cuda" if cuda else "_cpu"),
        sources=[str(_REPO / "python/ksa_torch/csrc/ops.cpp")],
        extra_include_paths=[str(_REPO / "include")],
        extra_cflags=flags,
        extra_ldflags=ldflags,
        with_cuda=cuda,
        verbose=bool(os.environ.get("KSA_VERBOSE_BUILD")),
    )
    return _ext


def attention(q, k, v, k_chunk, S, W, summarize_tail=False, scale=None, return_lse=False):
    """KSA attention over a stream. Returns out (and lse [B, L, Hq], fp32, natural log)."""
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out, lse = _load().forward(q, k, v, int(k_chunk), int(S), int(W), bool(summarize_tail),
                               float(scale) if scale else 0.0)
    if squeeze:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def count_visible_pairs(k_chunk, S, T, W, summarize_tail=False):
    """Visible (query, key) pairs per head: forward FLOPs are 4 * D * pairs * Hq * B."""
    return _load().count_visible_pairs(int(k_chunk), int(S), int(T), int(W), bool(summarize_tail))
