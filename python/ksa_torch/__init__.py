"""PyTorch operators for Kwai Summary Attention (KSA), a thin binding over the ksa C++/CUDA kernels.

Install (compiles the kernels and the binding against the installed torch; docs/torch.md):

    pip install --no-build-isolation ./python

Use:

    out = ksa_torch.attention(q, k, v, chunk_size=8, S=1, W=128)        # q [B, L, Hq, D], k/v [B, L, Hkv, D]
    out, lse = ksa_torch.attention(q, k, v, 8, 1, 128, return_lse=True)
    out = ksa_torch.attention_varlen(q, k, v, cu_seqlens, max_seqlen, 8, 1, 128)   # packed: q [N, Hq, D]
    out = ksa_torch.context_parallel_attention(q, k, v, 8, 1, 128, group)  # this rank's shard of one stream
    st = ksa_torch.build_stream(text_ids, 8, 1, cu_seqlens=text_cu)   # stream ids, positions, cu_seqlens

q, k, v are the *stream* (text with S summary tokens after every k text tokens), on CUDA (bf16/f16, head
dimension 64 or 128) or CPU (float32/bfloat16; float64 runs the oracle, for gradcheck). [L, H, D] tensors
are accepted too. Strided views (e.g. slices of a fused qkv projection) are read in place; gradients come
back dense. The operators are torch.ops.ksa.attention_fwd / attention_bwd: with torch >= 2.4 they have
fake implementations and a registered autograd formula (torch.compile traces them without graph breaks,
torch.library.opcheck passes); on older torch (e.g. Debian 12's 1.13) `attention` wraps them in a plain
torch.autograd.Function instead.
"""
import torch

try:
    from . import _C
except ImportError as e:  # not built, or built against another torch
    import pathlib

    _built = sorted(p.name for p in pathlib.Path(__file__).parent.glob("_C.*"))
    _why = (f"{_built[0]} does not load ({e}); was it built against another torch?" if _built else
            "the compiled extension ksa_torch._C is not there (this is the source folder, or the build failed)")
    raise ImportError(
        f"ksa_torch: {_why}. ksa_torch must be built against the installed torch {torch.__version__}: from the "
        "ksa repository run `pip install --no-build-isolation ./python` (or with -e for an editable install); "
        "see docs/torch.md.") from e

from ._ops import HAS_REGISTERED_AUTOGRAD, attention, attention_varlen  # noqa: E402
from .context_parallel import context_parallel_attention  # noqa: E402
from .layout import Stream, build_stream, stream_layout, stream_to_text, text_to_stream  # noqa: E402

__version__ = _C.__version__
has_cuda = _C.has_cuda  # built with the CUDA kernels

__all__ = [
    "attention", "attention_varlen", "context_parallel_attention", "build_stream", "stream_layout", "stream_to_text", "text_to_stream", "Stream",
    "visible_mask", "count_visible_pairs", "text_length_of_stream", "HAS_REGISTERED_AUTOGRAD", "has_cuda",
    "__version__",
]


def visible_mask(chunk_size, S, T, W, summarize_tail=False):
    """The rule (core `visible`) as a dense [L, L] bool CPU tensor over stream positions (for tests)."""
    return _C.visible_mask(int(chunk_size), int(S), int(T), int(W), bool(summarize_tail))


def count_visible_pairs(chunk_size, S, T, W, summarize_tail=False):
    """Visible (query, key) pairs per head: forward FLOPs are 4 * D * pairs * Hq * B."""
    return _C.count_visible_pairs(int(chunk_size), int(S), int(T), int(W), bool(summarize_tail))


def text_length_of_stream(chunk_size, S, L, summarize_tail=False):
    """The text length T of a stream of L rows (the core's inverse of the layout length), or -1 if none."""
    return _C.text_length_of_stream(int(chunk_size), int(S), int(L), bool(summarize_tail))
