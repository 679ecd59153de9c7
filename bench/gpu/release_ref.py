"""Reference for `ksa bench model` on the GPU: the KSA authors' own HuggingFace inference code (their
modeling_qwen3sa.py: Qwen3SummaryAttention, Qwen3RingBufferCache, prepare_inputs_for_generation) run on the
same checkpoint directory, batch 1, greedy. Their files are loaded from --release at run time (fetched by
bench/gpu/fetch_release.sh into the ignored .ref/ksa-release/); none of their code is copied here.

    bench/gpu/fetch_release.sh
    python3 bench/gpu/release_ref.py --model DIR --release .ref/ksa-release [--contexts 16384,131072] [--new 64]

What is stubbed, and why the result is their FlexAttention fallback:
  * `flash_attn` (FlashAttention-2): modeling_qwen3sa.py does `from flash_attn import flash_attn_func` at the top
    but never calls it. When the package is not installed, a module is put in sys.modules whose
    flash_attn_func raises if it is ever called. It has no `cute` submodule.
  * `summary_attn` is NOT stubbed: it is their own package, taken from their wheel
    (summary_attention_kernel/summary_attn-*.whl) by fetch_release.sh. Its summary_attn_func (their prefill
    attention) checks for the Hopper CuTe kernel with `from flash_attn.cute.interface import ...` and falls back
    to `_summary_attn_flex` (torch.compile(flex_attention) with their block mask) when that import fails. The
    stub above makes the import fail, and this script also sets `summary_attn.interface._CUTE_AVAILABLE = False`
    so that a partly installed flash_attn cannot pick the CuTe path. The prefill therefore runs their FlexAttention
    code, and decode runs their own code, which does not use summary_attn: ring-buffer cache plus
    F.scaled_dot_product_attention, since the model is loaded with attn_implementation="sdpa".
  * `check_model_inputs` (transformers.utils.generic): the forward decorator they import. Only if this transformers
    lacks it or rejects their `@check_model_inputs()` form is it replaced by a no-op decorator, and the script says
    so (--shim-check-model-inputs forces it). Its job is to record hidden states/attentions for output_* flags,
    which this benchmark does not use.
The model is their Qwen3ForCausalLM class with transformers' Qwen3Config read from our config.json. Any key of
our config.json that this transformers drops is set on the config object, so our checkpoint is never edited.

Driver (--driver loop, the default): their Qwen3RingBufferCache is created the way their Qwen3Model.forward
creates it, and each step calls their prepare_inputs_for_generation on the growing ids (it adds the summary
token at chunk boundaries and slices off what the cache already holds), then model(**inputs) and a greedy argmax.
This is what GenerationMixin.generate does with their model, minus logits processors and stopping criteria.
(Transformers >= 4.5x generate pre-allocates a DynamicCache, and their attention reads `_reorganized` from the
cache. --driver generate passes their ring cache to model.generate instead. It is here to try, not as the default.)
Timing: each context runs once to warm up (torch.compile of flex_attention, their block masks), then again, timed:
prefill s = the prefill forward plus the argmax; decode tok/s = N / (time of the N next steps). Both are
torch.cuda.synchronize'd. Peak memory is torch.cuda.max_memory_allocated over the timed run, and KV cache is the
bytes their cache has allocated at the end of it (capacities, headroom included).
"""
import argparse
import gc
import importlib
import importlib.machinery
import json
import os
import sys
import time
import traceback
import types

import torch

STUBS = []  # what was stubbed or patched, printed in the header


def install_flash_attn_stub():
    try:
        import flash_attn  # noqa: F401
        STUBS.append(f"flash_attn: the installed package ({getattr(flash_attn, '__file__', '?')}), not stubbed")
        return
    except Exception as e:  # not installed (or broken): stub it
        reason = f"{type(e).__name__}: {e}"
    mod = types.ModuleType("flash_attn")

    def flash_attn_func(*args, **kwargs):
        raise RuntimeError("flash_attn is stubbed by release_ref.py: flash_attn_func must not be called")

    mod.flash_attn_func = flash_attn_func
    mod.__file__ = "<stub: release_ref.py>"
    # transformers probes flash_attn with importlib.util.find_spec, which needs a spec on a sys.modules entry
    # (it then finds no installed distribution and treats FlashAttention as absent).
    mod.__spec__ = importlib.machinery.ModuleSpec("flash_attn", loader=None)
    sys.modules["flash_attn"] = mod  # a plain module: `flash_attn.cute` does not import
    STUBS.append(f"flash_attn: stub module ({reason}); flash_attn_func raises if called, no flash_attn.cute")


def compat_check_model_inputs():
    """Replaces transformers.utils.generic.check_model_inputs by a no-op decorator that takes both the
    `@check_model_inputs` and the `@check_model_inputs(...)` forms."""
    import transformers.utils.generic as generic

    def check_model_inputs(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda func: func

    generic.check_model_inputs = check_model_inputs
    STUBS.append("transformers.utils.generic.check_model_inputs: no-op decorator (this transformers has no "
                 "usable one; it only records outputs for output_hidden_states/output_attentions)")


def load_release(release_dir, shim_check_model_inputs=False):
    release_dir = os.path.abspath(release_dir)
    for f in ("modeling_qwen3sa.py", "summary_context.py"):
        if not os.path.isfile(os.path.join(release_dir, f)):
            sys.exit(f"release_ref.py: {release_dir} has no {f}; run bench/gpu/fetch_release.sh first")
    if not os.path.isfile(os.path.join(release_dir, "summary_attn", "interface.py")):
        sys.exit(f"release_ref.py: {release_dir} has no summary_attn/ (their wheel's package); "
                 "run bench/gpu/fetch_release.sh first")
    # transformers' own modules first (they probe for flash_attn at import time), then the stub.
    import transformers.activations  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    import transformers.cache_utils  # noqa: F401
    install_flash_attn_stub()
    sys.path.insert(0, release_dir)  # their summary_attn package (a top-level import of modeling_qwen3sa.py)
    import summary_attn.interface as sai
    sai._CUTE_AVAILABLE = False  # their own dispatch flag: False selects _summary_attn_flex
    STUBS.append(f"summary_attn: theirs, from {os.path.dirname(sai.__file__)}; _CUTE_AVAILABLE = False "
                 "(their FlexAttention path)")

    # modeling_qwen3sa.py imports `.summary_context`, so it is loaded as a module of a package whose path is
    # the release folder.
    pkg = types.ModuleType("ksa_release")
    pkg.__path__ = [release_dir]
    sys.modules["ksa_release"] = pkg

    import transformers.utils.generic as generic
    if shim_check_model_inputs or not hasattr(generic, "check_model_inputs"):
        compat_check_model_inputs()
    try:
        mod = importlib.import_module("ksa_release.modeling_qwen3sa")
    except TypeError:
        # e.g. a check_model_inputs that is not a decorator factory: `@check_model_inputs()` fails at import
        print("release_ref.py: importing modeling_qwen3sa.py failed; retrying with a no-op check_model_inputs:\n"
              + traceback.format_exc(limit=3), flush=True)
        sys.modules.pop("ksa_release.modeling_qwen3sa", None)
        compat_check_model_inputs()
        mod = importlib.import_module("ksa_release.modeling_qwen3sa")
    return mod, sai


def load_config(mod, model_dir):
    cfg_cls = mod.Qwen3Config
    cfg = cfg_cls.from_pretrained(model_dir)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    patched = []
    for k, v in raw.items():
        if k.startswith("summary_") or k in ("use_summary_attention", "mix_coeff", "truncate_predict_nums"):
            if not hasattr(cfg, k):
                setattr(cfg, k, v)
                patched.append(k)
    if patched:
        STUBS.append("config: set from our config.json because this Qwen3Config dropped them: " + ", ".join(patched))
    missing = [k for k in ("use_summary_attention", "summary_chunk_size", "summary_token_num", "summary_token_begin",
                           "summary_sliding_chunk_num", "summary_chunk_position_ids_type",
                           "summary_token_position_ids_type", "summary_independent_parameters", "mix_coeff")
               if not hasattr(cfg, k)]
    if missing:
        sys.exit(f"release_ref.py: {model_dir}/config.json lacks what their model reads: {', '.join(missing)}")
    return cfg


def sync():
    torch.cuda.synchronize()
    return time.perf_counter()


def cache_bytes(cache):
    n = 0
    for t in list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", [])):
        if t is not None:
            n += t.numel() * t.element_size()
    return n


def run_loop(mod, model, ids, new):
    """Their generate path by hand: returns (prefill s, decode s for `new` tokens, cache)."""
    cache = mod.Qwen3RingBufferCache(config=model.config, sliding_chunk_nums=model.model._sliding_chunk_nums)
    t0 = sync()
    inputs = model.prepare_inputs_for_generation(ids, past_key_values=cache, use_cache=True)
    out = model(**inputs)
    nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
    ids = torch.cat([ids, nxt], dim=1)
    t1 = sync()
    for _ in range(new):
        inputs = model.prepare_inputs_for_generation(ids, past_key_values=cache, use_cache=True)
        out = model(**inputs)
        nxt = out.logits[:, -1, :].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    t2 = sync()
    return t1 - t0, t2 - t1, cache


def run_generate(mod, model, ids, new):
    """HF generate with their ring cache passed in: prefill = generate(1), decode = generate(1 + new) - that."""
    times = []
    cache = None
    for n in (1, 1 + new):
        cache = mod.Qwen3RingBufferCache(config=model.config, sliding_chunk_nums=model.model._sliding_chunk_nums)
        t0 = sync()
        model.generate(ids, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       use_cache=True)
        times.append(sync() - t0)
    return times[0], times[1] - times[0], cache


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (ksa make-model output)")
    ap.add_argument("--release", required=True, help="folder with their modeling_qwen3sa.py, summary_context.py "
                    "and summary_attn/ (bench/gpu/fetch_release.sh makes .ref/ksa-release)")
    ap.add_argument("--contexts", default="16384,131072")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--driver", choices=("loop", "generate"), default="loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shim-check-model-inputs", action="store_true",
                    help="replace transformers' check_model_inputs by a no-op decorator even if it exists")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("release_ref.py: needs CUDA")

    mod, sai = load_release(a.release, a.shim_check_model_inputs)
    cfg = load_config(mod, a.model)
    t = time.perf_counter()
    model = mod.Qwen3ForCausalLM.from_pretrained(a.model, config=cfg, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa").cuda().eval()
    load_s = time.perf_counter() - t
    model.generation_config.pad_token_id = 0
    attn_impl = getattr(model.config, "_attn_implementation", None)
    rel = ""
    rc = os.path.join(a.release, "RELEASE_COMMIT")
    if os.path.isfile(rc):
        rel = open(rc).read().strip()
    import transformers
    print(f"KSA release HF code (prefill: their summary_attn FlexAttention path; decode: their ring-buffer cache "
          f"+ SDPA; driver: {a.driver}) on {a.model}")
    print(f"release: {os.path.abspath(a.release)} {rel}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}, "
          f"attn_implementation={attn_impl}, loaded in {load_s:.1f} s")
    print(f"config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}/"
          f"{cfg.num_key_value_heads}, chunk {cfg.summary_chunk_size}+{cfg.summary_token_num}, windows "
          f"{cfg.summary_sliding_chunk_num}, mix_coeff {cfg.mix_coeff}")
    for s in STUBS:
        print(f"  - {s}")
    print()
    table = ["| context | prefill s | decode tok/s | peak GiB | KV cache GiB | warm-up prefill s |",
             "|---|---|---|---|---|---|"]
    print("\n".join(table), flush=True)
    run = run_loop if a.driver == "loop" else run_generate
    g = torch.Generator(device="cpu").manual_seed(a.seed)
    for ctx in [int(x) for x in a.contexts.split(",") if x.strip()]:
        cache = None
        try:
            # token ids below 151936: the summary token (summary_token_begin) is never in the prompt
            ids = torch.randint(0, min(151936, cfg.summary_token_begin), (1, ctx), generator=g).cuda()
            with torch.no_grad():
                wp, _, cache = run(mod, model, ids, a.new)  # warm-up: compiles flex_attention, builds block masks
                del cache
                cache = None
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                p, d, cache = run(mod, model, ids, a.new)
            peak = torch.cuda.max_memory_allocated() / 2**30
            kv = cache_bytes(cache) / 2**30
            table.append(f"| {ctx} | {p:.3f} | {a.new / max(d, 1e-9):.1f} | {peak:.1f} | {kv:.2f} | {wp:.3f} |")
            print(table[-1], flush=True)
        except Exception as e:  # OOM at 128K, an API mismatch, ...: report it in the row and go on
            msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("|", "/")
            table.append(f"| {ctx} | error: {msg[:300]} | | {torch.cuda.max_memory_allocated() / 2**30:.1f} | | |")
            print(table[-1], flush=True)
            print(traceback.format_exc(limit=-6), file=sys.stderr, flush=True)
        finally:
            cache = None
            gc.collect()
            sai._FLEX_BLOCK_MASK_CACHE.clear()
            torch.cuda.empty_cache()
    # the table again, last, so that a `| tail` shows it whole after any traceback
    print(f"\nKSA release HF code ({a.driver}, {a.new} new tokens, batch 1) on {a.model}:")
    print("\n".join(table), flush=True)


if __name__ == "__main__":
    main()
