"""Helpers shared by the ksa_torch tests (shapes, exact-grid random data, error measures)."""
import torch


def stream_len(k, S, T, tail=False):
    full = T // k
    return T + (full + (1 if tail and T % k else 0)) * S


def grid_randn(*shape, generator, grid=2.0 ** -12, dtype=torch.float64):
    """Normal values on a 2^-12 grid: float32-exact, and so is every x +- 2^-10 gradcheck tries."""
    return ((torch.randn(*shape, generator=generator, dtype=torch.float64) / grid).round() * grid).to(dtype)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def dense_reference(q, k, v, mask, scale):
    """float64-able masked attention with torch autograd; q [B, L, Hq, D], k/v [B, L, Hkv, D], mask [L, L]."""
    G = q.shape[2] // k.shape[2]
    kd, vd = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
    s = torch.einsum("blhd,bmhd->bhlm", q, kd) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhlm,bmhd->blhd", torch.softmax(s, dim=-1), vd)
