"""Reference for `ksa bench model` on the GPU: HuggingFace transformers' plain Qwen3 (SDPA attention, static
KV cache, greedy) on the same checkpoint directory (the summary tensors are ignored, so this is full
attention over the text). Prefill time = generate(max_new_tokens=1); decode tok/s = N / (time of
generate(1 + N) - time of generate(1)), each the second of two runs (the first warms up / compiles).

    python3 bench/gpu/model_ref.py --model DIR [--contexts 16384,131072] [--new 64] [--compile]
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def timed_generate(model, ids, n, compile_):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
    if not compile_:
        kw["disable_compile"] = True
    torch.cuda.synchronize()
    t = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--contexts", default="16384,131072")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--compile", action="store_true", help="let generate compile the static-cache decode step")
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    model.generation_config.pad_token_id = 0
    print(f"HF transformers Qwen3 (SDPA, static cache{', compiled' if a.compile else ', eager'}) on {a.model}")
    print("| context | prefill s | decode tok/s |")
    print("|---|---|---|")
    for ctx in [int(x) for x in a.contexts.split(",")]:
        ids = torch.randint(0, 151936, (1, ctx), device="cuda")
        with torch.no_grad():
            for _ in range(2):
                p = timed_generate(model, ids, 1, a.compile)
                g = timed_generate(model, ids, 1 + a.new, a.compile)
        print(f"| {ctx} | {p:.3f} | {a.new / max(g - p, 1e-9):.1f} |", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
