"""The registered operators torch.ops.ksa.attention_fwd / attention_bwd: their schema on every torch, and
with torch >= 2.4 (fake implementations and autograd registered) torch.library.opcheck and torch.compile
with fullgraph=True on a small model of KSA layers (CPU here through the aot_eager backend; the CUDA variants,
with the default inductor backend, are marked `cuda`). On older torch (Debian 12's 1.13) those skip."""
import pytest
import torch
import torch.nn as nn

import ksa_torch
from common import grid_randn, stream_len

needs_library_api = pytest.mark.skipif(not ksa_torch.HAS_REGISTERED_AUTOGRAD,
                                       reason=f"torch {torch.__version__} has no torch.library.register_fake/"
                                              "register_autograd: attention() uses a plain autograd.Function")


def test_ops_are_registered():
    fwd, bwd = torch.ops.ksa.attention_fwd, torch.ops.ksa.attention_bwd
    assert "Tensor? cu_seqlens" in str(fwd.default._schema) and "bool deterministic" in str(fwd.default._schema)
    assert str(bwd.default._schema).startswith("ksa::attention_bwd(Tensor dout")
    assert isinstance(ksa_torch.__version__, str) and ksa_torch.__version__.count(".") == 2
    q = torch.randn(1, stream_len(4, 1, 9), 2, 8)
    out, lse = fwd(q, q[:, :, :1], q[:, :, 1:], None, 0, 4, 1, 1, False, 0.0, False)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]


def head_dim(device):
    return 64 if device == "cuda" else 16  # the CUDA kernels take D = 64 or 128


def small_inputs(device, dtype, varlen):
    gen = torch.Generator().manual_seed(4)
    if varlen:
        st = ksa_torch.stream_layout([9, 0, 20], 4, 1)
        N, cu = int(st.cu_seqlens[-1]), st.cu_seqlens.to(device)
        shape = (N,)
    else:
        cu = None
        shape = (2, stream_len(4, 1, 21))
    q, k, v = (grid_randn(*shape, h, head_dim(device), generator=gen).to(device=device, dtype=dtype) for h in (4, 2, 2))
    return q, k, v, cu


def opcheck_inputs(device, dtype, varlen):
    q, k, v, cu = small_inputs(device, dtype, varlen)
    out, lse = torch.ops.ksa.attention_fwd(q, k, v, cu, 0, 4, 1, 1, False, 0.0, True)
    dout = torch.randn_like(out)
    fwd_args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), cu, 0, 4, 1, 1, False, 0.0, True)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, cu, 0, 4, 1, 1, False, 0.0, True)
    return fwd_args, bwd_args


def run_opcheck(device, dtype):
    for varlen in (False, True):
        fwd_args, bwd_args = opcheck_inputs(device, dtype, varlen)
        torch.library.opcheck(torch.ops.ksa.attention_fwd.default, fwd_args)
        torch.library.opcheck(torch.ops.ksa.attention_bwd.default, bwd_args)


@needs_library_api
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_cpu(dtype):
    run_opcheck("cpu", dtype)


@pytest.mark.cuda
@needs_library_api
def test_opcheck_cuda():
    run_opcheck("cuda", torch.bfloat16)


class KsaLayer(nn.Module):
    def __init__(self, d=64, hq=4, hkv=2, hd=16, chunk_size=4, S=1, W=1):
        super().__init__()
        self.hq, self.hkv, self.hd, self.cfg = hq, hkv, hd, (chunk_size, S, W)
        self.qkv = nn.Linear(d, (hq + 2 * hkv) * hd, bias=False)
        self.o = nn.Linear(hq * hd, d, bias=False)

    def forward(self, x, cu_seqlens=None):
        qkv = self.qkv(x).unflatten(-1, (self.hq + 2 * self.hkv, self.hd))
        q, k, v = qkv[..., :self.hq, :], qkv[..., self.hq:self.hq + self.hkv, :], qkv[..., self.hq + self.hkv:, :]
        if cu_seqlens is None:
            a = ksa_torch.attention(q, k, v, *self.cfg)
        else:
            a = ksa_torch.attention_varlen(q, k, v, cu_seqlens, 0, *self.cfg)
        return x + self.o(a.flatten(-2))


def compile_check(device, dtype, backend):
    torch.manual_seed(0)
    model = nn.Sequential(KsaLayer(hd=head_dim(device)), KsaLayer(hd=head_dim(device))).to(device=device, dtype=dtype)
    st = ksa_torch.stream_layout([9, 0, 20], 4, 1)
    cu = st.cu_seqlens.to(device)
    for varlen in (False, True):
        x = torch.randn(int(cu[-1]) if varlen else stream_len(4, 1, 21), 64, device=device, dtype=dtype)
        if not varlen:
            x = torch.stack([x, x.flip(0)])

        def step(x):
            h = x
            for layer in model:
                h = layer(h, cu if varlen else None)
            return h.float().square().mean()

        eager_loss = step(x)
        eager = torch.autograd.grad(eager_loss, list(model.parameters()))
        torch._dynamo.reset()
        compiled = torch.compile(step, backend=backend, fullgraph=True)  # fullgraph: a graph break is an error
        loss = compiled(x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        assert torch.allclose(loss, eager_loss, rtol=tol, atol=tol)
        for a, b in zip(grads, eager):
            assert torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())
        explain = torch._dynamo.explain(step)(x)
        assert explain.graph_break_count == 0, explain.break_reasons


@needs_library_api
def test_torch_compile_fullgraph_cpu():
    compile_check("cpu", torch.float32, "aot_eager")


@pytest.mark.cuda
@needs_library_api
def test_torch_compile_fullgraph_cuda():
    compile_check("cuda", torch.bfloat16, "inductor")
