"""Writes a plain Qwen3 checkpoint (config.json, safetensors, tokenizer.json; e.g. `ksa make-model --shape 4b`
with use_summary_attention set to false) as a GGUF file that llama.cpp loads, for the side-by-side CPU
benchmark of bench/llama_cpp/compare.sh. Matrices stay bf16 (copied as they are), norms become f32, the vocab
is padded with [PAD{i}] tokens to the embedding's rows as llama.cpp's own converter does.

    python3 bench/llama_cpp/to_gguf.py MODEL_DIR OUT.gguf

Needs numpy and llama.cpp's gguf-py on PYTHONPATH (compare.sh sets it). Not a general converter: Qwen3 dense
models only, no KSA layers (llama.cpp has no summary attention).
"""
import json
import pathlib
import struct
import sys

import numpy as np
import gguf


def safetensors_tensors(model_dir):
    """name -> (dtype, shape, numpy memmap of the raw bytes) over every *.safetensors file."""
    out = {}
    for f in sorted(pathlib.Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], np.memmap(f, dtype=np.uint8, mode="r", offset=base + b,
                                                                 shape=(e - b,)))
    return out


def as_f32(dtype, raw):
    if dtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F32":
        return raw.view(np.float32)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    raise SystemExit(f"to_gguf: unsupported dtype {dtype}")


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    src, dst = pathlib.Path(sys.argv[1]), sys.argv[2]
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("use_summary_attention"):
        raise SystemExit("to_gguf: this checkpoint uses summary attention, which llama.cpp does not have; set "
                         "use_summary_attention to false in config.json for a plain Qwen3 of the same shape")
    tok = json.loads((src / "tokenizer.json").read_text())
    tensors = safetensors_tensors(src)
    n_vocab = tensors["model.embed_tokens.weight"][1][0]

    w = gguf.GGUFWriter(dst, "qwen3")
    w.add_name(src.name)
    w.add_context_length(int(cfg["max_position_embeddings"]))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(int(cfg["num_attention_heads"]))
    w.add_head_count_kv(int(cfg["num_key_value_heads"]))
    w.add_key_length(int(cfg["head_dim"]))
    w.add_value_length(int(cfg["head_dim"]))
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)

    # Byte-level BPE vocabulary: the model's vocab, the added tokens (control), [PAD{i}] up to the embedding.
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in tok["model"]["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for a in tok.get("added_tokens", []):
        if a["id"] < n_vocab:
            tokens[a["id"]] = a["content"]
            types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {a["content"]: a["id"] for a in tok.get("added_tokens", [])}
    if "<|endoftext|>" in ids:
        w.add_eos_token_id(ids["<|endoftext|>"])
        w.add_pad_token_id(ids["<|endoftext|>"])
    w.add_add_bos_token(False)

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, (dtype, shape, raw) in tensors.items():
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            parts = name.split(".")  # model.layers.N.<module...>.weight
            if parts[:2] != ["model", "layers"] or ".".join(parts[3:-1]) not in names:
                raise SystemExit(f"to_gguf: unexpected tensor {name}")
            out = f"blk.{parts[2]}.{names['.'.join(parts[3:-1])]}.weight"
        if len(shape) == 1:
            w.add_tensor(out, as_f32(dtype, raw))
        elif dtype == "BF16":
            w.add_tensor(out, raw.view(np.uint16).reshape(shape), raw_shape=shape,
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            raise SystemExit(f"to_gguf: {name} is {dtype}; write the checkpoint in bf16 (ksa make-model --dtype bf16)")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    print(f"to_gguf: wrote {dst} ({len(tensors)} tensors, vocab {n_vocab})")


if __name__ == "__main__":
    main()
