"""Qwen3-KSA as a PyTorch nn.Module with the C++ engine's semantics (docs/ksa.md, src/model/model.cpp), on
ksa_torch.attention, and its export to the released HuggingFace layout that `ksa generate -m DIR` loads.

One module, three attention modes of the same shape (Config.attn):
  "ksa"  : the KSA stream (S summary tokens after every k text tokens, ids summary_token_begin + j), RoPE at
           the stream positions of the config (text `origin`/`inner_chunk`; summaries `zeros`/
           `last_chunk_slice_left`/`last_chunk_slice_right`), summary q/k/v = mix * proj_summary(h) +
           (1 - mix) * proj(h), the optional summary input layernorm, per-layer windows W and per-layer
           summary/plain flags (a plain layer attends causally over the text and leaves the summary rows'
           hidden states unchanged), tied or untied lm_head, logits at text rows only, truncated to
           summary_token_begin entries.
  "swa"  : the same stream and rule, but the summary tokens carry nothing: their q/k/v are zero in every layer
           (exported as zero *_proj_summary with mix_coeff 1, so the engine computes exactly this). A text
           token then gets no content from beyond its window: each chunk older than the window contributes one
           key of logit 0 and value 0 to the softmax (a content-free "null" entry). This is the sliding-window
           baseline in a form the engine runs unchanged (the core rule has S >= 1).
  "full" : plain Qwen3 (use_summary_attention false): causal attention over the text, no summary tokens.

Context parallelism (python/examples/train_cp.py, docs/context_parallel.md): forward(text, shard=Shard(...))
runs only stream rows [a, b) of every sequence on this rank (the layers' attention through
ksa_torch.context_parallel_attention over the shard's process group; everything else is per row) and returns
the logits of the text tokens in those rows (Shard.text_range says which).

Numerics follow the engine's CPU backend where it matters for comparisons: RMSNorm in fp32, RoPE in the
rotate_half form with inv_freq = theta^(-2i/D) computed in fp32. On CUDA the matrix products and attention run
in bf16 under autocast (ksa_torch's CUDA kernels take bf16); on the CPU everything is fp32.
"""
import dataclasses
import json
import math
import pathlib
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F

import ksa_torch


@dataclasses.dataclass
class Config:
    text_vocab: int = 4096            # tokenizer ids; the summary ids follow (summary_token_begin = text_vocab)
    hidden: int = 256
    intermediate: int = 768
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 10000.0
    eps: float = 1e-6
    max_positions: int = 8192
    tie: bool = True
    attn: str = "ksa"                 # ksa | swa | full
    chunk_size: int = 8
    S: int = 1
    windows: list = None              # W per layer (chunks); default [16] * layers
    summary_layers: list = None       # 1 = summary-attention layer, 0 = plain causal layer; default all 1
    mix_coeff: float = 1.0
    summary_layernorm: bool = False
    text_positions: str = "origin"
    summary_positions: str = "last_chunk_slice_right"
    eos_id: int = 4095
    dropout: float = 0.0              # training only (embeddings and each residual branch); not exported

    def __post_init__(self):
        if self.windows is None:
            self.windows = [16] * self.layers
        if isinstance(self.windows, int):
            self.windows = [self.windows] * self.layers
        if self.summary_layers is None:
            self.summary_layers = [1] * self.layers
        assert len(self.windows) == self.layers and len(self.summary_layers) == self.layers
        assert self.attn in ("ksa", "swa", "full"), self.attn
        assert self.hidden % 2 == 0 and self.head_dim % 2 == 0 and self.heads % self.kv_heads == 0
        if self.attn == "swa":
            self.mix_coeff = 1.0  # summary q/k/v come from the (zero) summary projections alone

    @property
    def summaries(self):
        return self.attn != "full"

    @property
    def vocab_size(self):  # embedding rows: text ids, then the S summary ids
        return self.text_vocab + (self.S if self.summaries else 0)

    def to_dict(self):
        return dataclasses.asdict(self)

    def hf_config(self):
        """config.json in the released format (the keys ModelConfig::to_json writes)."""
        W = self.windows
        pattern = f"[{W[0]}]*{len(W)}" if len(set(W)) == 1 else json.dumps(W)
        c = {
            "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": self.eos_id, "eos_token_id": self.eos_id, "head_dim": self.head_dim,
            "hidden_act": "silu", "hidden_size": self.hidden, "initializer_range": 0.02,
            "intermediate_size": self.intermediate, "max_position_embeddings": self.max_positions,
            "max_window_layers": self.layers, "model_type": "qwen3", "num_attention_heads": self.heads,
            "num_hidden_layers": self.layers, "num_key_value_heads": self.kv_heads, "rms_norm_eps": self.eps,
            "rope_scaling": None, "rope_theta": self.rope_theta, "sliding_window": None,
            "tie_word_embeddings": self.tie, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
            "use_cache": True, "use_sliding_window": False, "vocab_size": self.vocab_size,
            "use_summary_attention": self.summaries, "ksa_train_attn": self.attn,
        }
        if self.summaries:
            c.update({
                "summary_token_begin": self.text_vocab, "summary_chunk_size": self.chunk_size,
                "summary_token_num": self.S, "summary_sliding_chunk_num": pattern,
                "summary_chunk_position_ids_type": self.text_positions,
                "summary_token_position_ids_type": self.summary_positions,
                "summary_independent_parameters": True, "mix_coeff": self.mix_coeff,
                "summary_independent_attention_layernorm": self.summary_layernorm,
                "summary_attention_mode": "kernel", "truncate_predict_nums": self.text_vocab,
            })
            if not all(self.summary_layers):
                c["summary_layer_freq"] = json.dumps(self.summary_layers)
        return c


def add_shape_args(ap, hidden, layers, window):
    """The model-shape flags the training scripts share (--hidden ... --window), with their defaults; the
    heads, the head dim and the chunking default to Config's."""
    ap.add_argument("--hidden", type=int, default=hidden)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--heads", type=int, default=Config.heads)
    ap.add_argument("--kv-heads", type=int, default=Config.kv_heads)
    ap.add_argument("--head-dim", type=int, default=Config.head_dim)
    ap.add_argument("--chunk-size", type=int, default=Config.chunk_size, help="text tokens per chunk (k)")
    ap.add_argument("--S", type=int, default=Config.S)
    ap.add_argument("--window", type=int, default=window, help="W in chunks (every layer)")


@dataclasses.dataclass
class Shard:
    """This rank's part of a context-parallel forward: stream rows [a, b) of each sequence, where a and b come from
    `rows`, every rank's row count (group rank order; the same on every rank), and the process group of the ranks
    that hold the other parts."""
    group: object
    rows: tuple
    rank: int

    @classmethod
    def even(cls, L, group, rank, world):
        """L stream rows cut into `world` near-equal shards (boundaries anywhere: mid-chunk is fine)."""
        return cls(group, tuple(L * (r + 1) // world - L * r // world for r in range(world)), rank)

    @property
    def a(self):
        return sum(self.rows[:self.rank])

    @property
    def b(self):
        return self.a + self.rows[self.rank]

    def text_range(self, text_rows):
        """(t0, t1): the text tokens whose stream rows (text_rows [T], ascending) are in [a, b)."""
        t0 = int(torch.searchsorted(text_rows, torch.tensor(self.a, device=text_rows.device)))
        t1 = int(torch.searchsorted(text_rows, torch.tensor(self.b, device=text_rows.device)))
        return t0, t1


def _attend(q, k, v, chunk_size, S, W, shard):
    if shard is None:
        return ksa_torch.attention(q, k, v, chunk_size, S, W)
    return ksa_torch.context_parallel_attention(q, k, v, chunk_size, S, W, shard.group, rows=shard.rows)


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def rope(x, pos, theta):
    """HF rotate_half RoPE. x [B, L, H, D], pos [B, L] (int)."""
    D = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device, dtype=torch.float32) / D))
    f = pos.float()[..., None] * inv                       # [B, L, D/2]
    cos, sin = torch.cat([f.cos(), f.cos()], -1)[:, :, None], torch.cat([f.sin(), f.sin()], -1)[:, :, None]
    xf = x.float()
    rot = torch.cat([-xf[..., D // 2:], xf[..., :D // 2]], -1)
    return xf * cos + rot * sin


class Layer(nn.Module):
    def __init__(self, c: Config, i: int):
        super().__init__()
        self.c, self.i = c, i
        H, D = c.hidden, c.head_dim
        self.input_layernorm = RMSNorm(H, c.eps)
        self.q_proj = nn.Linear(H, c.heads * D, bias=False)
        self.k_proj = nn.Linear(H, c.kv_heads * D, bias=False)
        self.v_proj = nn.Linear(H, c.kv_heads * D, bias=False)
        self.o_proj = nn.Linear(c.heads * D, H, bias=False)
        self.q_norm, self.k_norm = RMSNorm(D, c.eps), RMSNorm(D, c.eps)
        self.summary_layer = c.summaries and bool(c.summary_layers[i])
        self.proj_summary = self.summary_layer and c.attn == "ksa" and c.mix_coeff != 0
        if self.proj_summary:
            self.q_proj_summary = nn.Linear(H, c.heads * D, bias=False)
            self.k_proj_summary = nn.Linear(H, c.kv_heads * D, bias=False)
            self.v_proj_summary = nn.Linear(H, c.kv_heads * D, bias=False)
        if c.summaries and c.summary_layernorm and self.summary_layer:
            self.input_layernorm_summary = RMSNorm(H, c.eps)
        self.post_attention_layernorm = RMSNorm(H, c.eps)
        self.gate_proj = nn.Linear(H, c.intermediate, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate, bias=False)
        self.down_proj = nn.Linear(c.intermediate, H, bias=False)

    def forward(self, x, pos, is_sum, T, shard=None):
        """x [B, L, H] (the stream, or a shard's rows of it), pos [B, L], is_sum [L] bool (summary rows), T text
        tokens of the whole stream."""
        c, B, L = self.c, x.shape[0], x.shape[1]
        saved = x[:, is_sum] if (c.summaries and not self.summary_layer) else None
        h = self.input_layernorm(x)
        if hasattr(self, "input_layernorm_summary"):
            h = torch.where(is_sum[None, :, None], self.input_layernorm_summary(x).to(h.dtype), h)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        if c.summaries and self.summary_layer and c.attn == "swa":
            keep = (~is_sum)[None, :, None].to(q.dtype)  # the summary rows' q/k/v are zero (see the module doc)
            q, k, v = q * keep, k * keep, v * keep
        elif self.proj_summary:
            m = c.mix_coeff
            s = is_sum[None, :, None]
            q = torch.where(s, m * self.q_proj_summary(h) + (1 - m) * q, q)
            k = torch.where(s, m * self.k_proj_summary(h) + (1 - m) * k, k)
            v = torch.where(s, m * self.v_proj_summary(h) + (1 - m) * v, v)
        D = c.head_dim
        q = rope(self.q_norm(q.view(B, L, c.heads, D)), pos, c.rope_theta)
        k = rope(self.k_norm(k.view(B, L, c.kv_heads, D)), pos, c.rope_theta)
        v = v.view(B, L, c.kv_heads, D)
        dt = torch.bfloat16 if x.is_cuda else torch.float32
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if not c.summaries and x.is_cuda and shard is None and hasattr(F, "scaled_dot_product_attention"):
            # Plain causal attention through PyTorch's flash kernel on CUDA (the same function as the line below).
            g = c.heads // c.kv_heads
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2),
                                               v.repeat_interleave(g, 2).transpose(1, 2), is_causal=True).transpose(1, 2)
        elif not c.summaries:
            a = _attend(q, k, v, T + 1, 1, 1, shard)  # one chunk longer than the text: causal, no summary
        elif self.summary_layer:
            a = _attend(q, k, v, c.chunk_size, c.S, c.windows[self.i], shard)
        else:  # a plain layer: W covers every chunk, so text sees all text and no summary
            a = _attend(q, k, v, c.chunk_size, c.S, T // c.chunk_size + 1, shard)
        x = x + F.dropout(self.o_proj(a.reshape(B, L, c.heads * D)), c.dropout, self.training)
        h = self.post_attention_layernorm(x)
        x = x + F.dropout(self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)), c.dropout, self.training)
        if saved is not None:
            x = x.clone()
            x[:, is_sum] = saved
        return x


class KsaLM(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.layers))
        self.norm = RMSNorm(c.hidden, c.eps)
        if not c.tie:
            self.lm_head = nn.Linear(c.hidden, c.vocab_size, bias=False)  # the released shape; rows past text_vocab unused
        self._layouts = {}
        self.reset_parameters()

    def reset_parameters(self):
        c = self.c
        nn.init.normal_(self.embed_tokens.weight, std=0.02)
        for n, p in self.named_parameters():
            if p.dim() == 2 and "embed" not in n:
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * c.layers) if ("o_proj" in n or "down_proj" in n) else 1))

    def stream(self, text):
        """input ids [B, L], positions [B, L], is_summary [L] and text rows [T] of the stream of text [B, T]."""
        c = self.c
        B, T = text.shape
        if not c.summaries:
            pos = torch.arange(T, device=text.device)[None].expand(B, T)
            return text, pos, torch.zeros(T, dtype=torch.bool, device=text.device), None
        key = (T, text.device)
        if key not in self._layouts:  # the layout depends on T only: the core's, computed once per length
            st = ksa_torch.build_stream(torch.zeros(T, dtype=torch.int64), c.chunk_size, c.S,
                                        summary_token_begin=c.text_vocab, text_positions=c.text_positions,
                                        summary_positions=c.summary_positions)
            self._layouts[key] = tuple(t.to(text.device) for t in (st.input_ids, st.position_ids, st.is_summary.bool(),
                                                                    st.text_rows.long()))
        template, pos, is_sum, rows = self._layouts[key]
        ids = template[None].repeat(B, 1)
        ids[:, rows] = text
        return ids, pos[None].expand(B, -1), is_sum, rows

    def forward(self, text, shard=None):
        """Logits [B, T, text_vocab] at the text positions of text [B, T]; with a Shard, only those of the text
        tokens in the shard's stream rows (shard.text_range(self.text_rows(T, device)) of them)."""
        ids, pos, is_sum, rows = self.stream(text)
        T = text.shape[1]
        if shard is not None:
            if rows is None:  # no summaries: the stream is the text
                rows = torch.arange(T, device=text.device)
            t0, t1 = shard.text_range(rows)
            ids, pos, is_sum, rows = ids[:, shard.a:shard.b], pos[:, shard.a:shard.b], is_sum[shard.a:shard.b], \
                rows[t0:t1] - shard.a
        x = F.dropout(self.embed_tokens(ids), self.c.dropout, self.training)
        for layer in self.layers:
            x = layer(x, pos, is_sum, T, shard)
        if rows is not None:
            x = x[:, rows]
        h = self.norm(x)
        w = (self.embed_tokens.weight if self.c.tie else self.lm_head.weight)[:self.c.text_vocab]
        return F.linear(h, w)

    def text_rows(self, T, device):
        """The stream row of every text token of a T-token text (its own index without summaries)."""
        rows = self.stream(torch.zeros(1, T, dtype=torch.int64, device=device))[3]
        return torch.arange(T, device=device) if rows is None else rows

    def hf_state_dict(self):
        """Tensors under the released names (docs/ksa.md: The model), fp32 on the CPU."""
        out = {"model.embed_tokens.weight": self.embed_tokens.weight, "model.norm.weight": self.norm.weight}
        if not self.c.tie:
            out["lm_head.weight"] = self.lm_head.weight
        for i, L in enumerate(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = L.input_layernorm.weight
            out[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.weight
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[p + f"self_attn.{n}.weight"] = getattr(L, n).weight
            out[p + "self_attn.q_norm.weight"] = L.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = L.k_norm.weight
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[p + f"mlp.{n}.weight"] = getattr(L, n).weight
            if L.proj_summary:
                for n in ("q", "k", "v"):
                    out[p + f"self_attn.{n}_proj_summary.weight"] = getattr(L, f"{n}_proj_summary").weight
            elif self.c.attn == "swa" and L.summary_layer:  # the engine then computes zero summary q/k/v
                for n in ("q", "k", "v"):
                    out[p + f"self_attn.{n}_proj_summary.weight"] = torch.zeros_like(getattr(L, f"{n}_proj").weight)
            if hasattr(L, "input_layernorm_summary"):
                out[p + "input_layernorm_summary.weight"] = L.input_layernorm_summary.weight
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_hf(cls, c: Config, tensors):
        m = cls(c)
        mine = m.hf_state_dict()
        missing = set(mine) - set(tensors)
        assert not missing, f"missing tensors: {sorted(missing)[:5]}"
        with torch.no_grad():
            for name, t in tensors.items():
                tgt = _param_for(m, name)
                if tgt is not None:
                    tgt.copy_(t.to(tgt.dtype))
        return m


def _param_for(m, name):
    if name == "model.embed_tokens.weight":
        return m.embed_tokens.weight
    if name == "model.norm.weight":
        return m.norm.weight
    if name == "lm_head.weight":
        return m.lm_head.weight if not m.c.tie else None
    parts = name.split(".")  # model.layers.{i}.{group}.{name}.weight or model.layers.{i}.{name}.weight
    L = m.layers[int(parts[2])]
    attr = parts[-2]
    mod = getattr(L, attr, None)
    return mod.weight if mod is not None else None  # zero summary projections of "swa" have no parameter


# ---- safetensors (the format: 8-byte little-endian header length, JSON header, raw little-endian data) ----

def _tensor_bytes(t):
    t = t.contiguous().cpu()
    try:
        import numpy  # noqa: F401
        return t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    except (ImportError, RuntimeError):
        return bytes(t.view(torch.uint8).flatten().tolist()) if t.dtype != torch.uint8 else bytes(t.tolist())


def save_safetensors(tensors, path, dtype=torch.bfloat16):
    names = sorted(tensors)
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for n in names:
        b = _tensor_bytes(tensors[n].to(dtype))
        header[n] = {"dtype": {torch.bfloat16: "BF16", torch.float32: "F32"}[dtype],
                     "shape": list(tensors[n].shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def load_safetensors(path):
    data = pathlib.Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        a, b = e["data_offsets"]
        raw = bytearray(data[8 + n + a:8 + n + b])
        dt = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[e["dtype"]]
        out[name] = torch.frombuffer(raw, dtype=dt).reshape(e["shape"]).clone() if raw else torch.empty(e["shape"], dtype=dt)
    return out


def export(model: KsaLM, out_dir, tokenizer_dir, dtype=torch.bfloat16):
    """The released layout: config.json, model.safetensors (bf16), generation_config.json, tokenizer files."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.c
    save_safetensors(model.hf_state_dict(), out / "model.safetensors", dtype)
    (out / "config.json").write_text(json.dumps(c.hf_config(), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": c.eos_id, "eos_token_id": c.eos_id, "transformers_version": "4.51.0"}, indent=2) + "\n")
    (out / "ksa_train_config.json").write_text(json.dumps(c.to_dict(), indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        src = pathlib.Path(tokenizer_dir) / name
        if src.exists():
            (out / name).write_bytes(src.read_bytes())
    return out


def load_exported(dir_, dtype=torch.float32):
    """The module of an exported checkpoint (its ksa_train_config.json and model.safetensors)."""
    d = pathlib.Path(dir_)
    c = Config(**json.loads((d / "ksa_train_config.json").read_text()))
    m = KsaLM.from_hf(c, load_safetensors(d / "model.safetensors"))
    return m.to(dtype)
