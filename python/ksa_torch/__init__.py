"""PyTorch op for Kwai Summary Attention (KSA), a thin binding over the ksa C++/CUDA kernels.

Build: first build the C++ libraries with CMake (`cmake -S . -B build && cmake --build build`), then
`import ksa_torch` (with `python/` on PYTHONPATH) compiles the binding once with torch's cpp_extension and
links the static libraries from $KSA_BUILD_DIR (default: <repo>/build).

    out = ksa_torch.attention(q, k, v, k_chunk=8, S=1, W=128)          # q [B, L, Hq, D], k/v [B, L, Hkv, D]
    out, lse = ksa_torch.attention(q, k, v, 8, 1, 128, return_lse=True)
    out.backward(grad)                                                   # differentiable in q, k, v

q, k, v are the *stream* (text with S summary tokens after every k text tokens), on CUDA (bf16/f16,
head dim 64 or 128) or CPU (f32/bf16). [L, H, D] tensors are accepted too. Strided views (e.g. slices of a
fused qkv projection) are read in place; gradients come back dense.
"""
import os
import pathlib
import zlib

import torch
from torch.autograd.function import once_differentiable
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
    # cpp_extension rebuilds when the sources or flags change, not when a linked library does: a stamp of the
    # libraries in the flags makes a rebuilt kernel library relink the binding.
    stamp = zlib.crc32(repr([(p, os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in libs]).encode())
    flags = ["-O3", "-std=c++20", "-fopenmp", f"-DKSA_LIBS_STAMP={stamp}"] + (["-DKSA_HAVE_CUDA=1"] if cuda else [])
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


class _Attention(torch.autograd.Function):
    """out, lse = KSA attention; backward gives dq, dk, dv (lse is not differentiable).

    float32 / bfloat16 / float16 run the ksa kernels (CUDA: ksa::cuda::attention_forward/backward; CPU:
    ksa::cpu::attention_forward/backward). float64 (CPU only, for torch.autograd.gradcheck) runs the oracle
    instead: ksa::cpu::attention_reference and attention_reference_backward, which accumulate in double but
    read their inputs as float32, so the result is exact only for float32-representable inputs (gradcheck:
    put the inputs on a 2^-12 grid and use eps = 2^-10, then every perturbed input is exact).
    """

    @staticmethod
    def forward(ctx, q, k, v, k_chunk, S, W, summarize_tail, scale, deterministic):
        ext = _load()
        if q.dtype == torch.float64:
            out, lse = ext.reference_forward(q, k, v, k_chunk, S, W, summarize_tail, scale)
        else:
            out, lse = ext.forward(q, k, v, k_chunk, S, W, summarize_tail, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (k_chunk, S, W, summarize_tail, scale, deterministic)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        k_chunk, S, W, summarize_tail, scale, deterministic = ctx.config
        ext = _load()
        if dout is None:
            dout = torch.zeros_like(out)
        # The kernels need the innermost dim contiguous and 16-byte aligned rows: a dense copy is the safe form
        # of an arbitrary incoming gradient (e.g. an expanded one with zero strides).
        dout = dout.to(out.dtype).contiguous()
        if q.dtype == torch.float64:
            dq, dk, dv = ext.reference_backward(q, k, v, dout, k_chunk, S, W, summarize_tail, scale)
        else:
            dq, dk, dv = ext.backward(q, k, v, out, lse, dout, k_chunk, S, W, summarize_tail, scale, deterministic)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q, k, v, k_chunk, S, W, summarize_tail=False, scale=None, return_lse=False, deterministic=False):
    """KSA attention over a stream. Returns out (and lse [B, L, Hq], fp32, natural log; not differentiable).

    Differentiable in q, k and v. `deterministic` is passed to the backward: on Hopper (sm_90a) with head
    dimension 128 and deterministic=False the CUDA backward computes dQ inside its dK/dV pass and adds it with
    fp32 reduce-adds, so dq's last bits vary from run to run (faster: 5 instead of 7 matrix products per tile
    pair; KSA_CUDA_BWD_FUSED_DQ=0 turns this off). deterministic=True, or any other GPU or head dimension,
    gives the same bits every run. float64 CPU tensors run the oracle (see _Attention), for gradcheck.
    """
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    out, lse = _Attention.apply(q, k, v, int(k_chunk), int(S), int(W), bool(summarize_tail),
                                float(scale) if scale else 0.0, bool(deterministic))
    if squeeze:
        out, lse = out.squeeze(0), lse.squeeze(0)
    return (out, lse) if return_lse else out


def visible_mask(k_chunk, S, T, W, summarize_tail=False):
    """The rule (core `visible`) as a dense [L, L] bool CPU tensor over stream positions (for tests)."""
    return _load().visible_mask(int(k_chunk), int(S), int(T), int(W), bool(summarize_tail))


def count_visible_pairs(k_chunk, S, T, W, summarize_tail=False):
    """Visible (query, key) pairs per head: forward FLOPs are 4 * D * pairs * Hq * B."""
    return _load().count_visible_pairs(int(k_chunk), int(S), int(T), int(W), bool(summarize_tail))
