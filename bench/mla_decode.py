"""MLA decode benchmark: moeray's weight-absorbed decode over the latent cache vs transformers.

    cd /work/main && PYTHONPATH=. timeout 900 python bench/mla_decode.py            # full run
    cd /work/main && PYTHONPATH=. timeout 900 python bench/mla_decode.py --quick    # smoke run

Prints JSON lines on stdout:
- "config": the benchmark model (V2-Lite's attention shapes, tiny everything else) and the method;
- "cache_bytes_per_token": ours (LatentCache.bytes_per_token) vs what transformers' DynamicCache holds;
- "generate_check": real prefill + greedy generate() of both at batch 1, context 512 (tokens must agree);
- one line per decode case {"case", "batch", "context", "moeray_tok_s", "transformers_tok_s", "ratio", ...};
- "preset_cache": per real preset (v2, v2-lite; shapes only) the bf16 cache bytes per token of the latent
  vs an expanded K/V cache and vs the paper's MHA baseline 2·n_h·d_h·l.

Both models load the same random fp32 weights from one temporary folder. transformers 5.23 caches the
latent too, but re-expands K and V with kv_b_proj over the whole context at every step; ours attends
over the latent directly (W_UK folded into the query, W_UV applied after attention).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import transformers
from transformers import DynamicCache

from bench.args import positive_int, positive_ints
from model import CacheBatch, DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache

# V2-Lite attention (16 heads, d_h 128, d_R 64, d_v 128, d_c 512, no q compression, YaRN x40);
# small hidden size, 2 layers (one dense, one MoE), small experts and vocabulary.
BENCH_OVERRIDES = dict(
    hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=2,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, vocab_size=2048,
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
METHOD = (
    "decode only: per case both models get the same synthetic context of `context` tokens per sequence "
    "(random latents [c_KV ; k_R], written into our LatentCache and into transformers' DynamicCache, which "
    "caches exactly that latent); a real batched prefill of 8 x 4096 tokens would need ~24 GB and ~10 min here. "
    "Then N greedy single-token decode forwards (the calls generate() makes; transformers' cache grows by "
    "torch.cat as in its generate) are timed one by one; tok/s = batch / median step time (median: the "
    "machine is shared; the two models' steps are interleaved). generate_check runs both generate() end to "
    "end (real prefill) and times decode as generate wall time after the prefill forward returned, over "
    "batch*(N-1) tokens, best of 3 interleaved runs"
)


def ours_steps(model, cache, block_tables, tokens, context):
    """Greedy decode steps as generate() makes them; yields each step's new tokens [B]."""
    positions = torch.full_like(tokens, context)[:, None]
    while True:
        logits = model(tokens[:, None], cache=cache, cache_batch=CacheBatch(block_tables, positions)).logits
        tokens = logits[:, -1].argmax(-1)
        positions = positions + 1
        yield tokens


def hf_steps(model, cache, tokens):
    while True:
        tokens = model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)
        yield tokens


def decode_case(ours, hf, config, batch, context, steps, generator) -> dict:
    shape = (config.num_hidden_layers, batch, context)
    c_kv = torch.randn(*shape, config.kv_lora_rank, generator=generator)
    k_rope = torch.randn(*shape, config.qk_rope_head_dim, generator=generator)
    first = torch.randint(3, config.vocab_size, (batch,), generator=generator)
    cache, block_tables = LatentCache.for_batch(config, batch, context + steps)
    fill = CacheBatch(block_tables, torch.arange(context).expand(batch, -1))
    hf_cache = DynamicCache(config=hf.config)
    for layer in range(config.num_hidden_layers):
        cache.write(layer, fill, c_kv[layer], k_rope[layer])
        hf_cache.update(c_kv[layer][:, None].clone(), k_rope[layer][:, None].clone(), layer)
    del c_kv, k_rope
    runners = {
        "moeray": ours_steps(ours, cache, block_tables, first, context),
        "transformers": hf_steps(hf, hf_cache, first),
    }
    times = {name: [] for name in runners}
    tokens = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(steps):  # interleaved, so both see the same background load
            for name, runner in runners.items():
                start = time.perf_counter()
                tokens[name].append(next(runner))
                times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "case": f"b{batch}_ctx{context}", "batch": batch, "context": context,
        "moeray_tok_s": round(1000 * batch / ms["moeray"], 2),
        "transformers_tok_s": round(1000 * batch / ms["transformers"], 2),
        "ratio": round(ms["transformers"] / ms["moeray"], 2),
        "tokens_equal": torch.equal(torch.stack(tokens["moeray"]), torch.stack(tokens["transformers"])),
        **{f"{name}_ms_per_step": round(v, 2) for name, v in ms.items()},
        **{f"{name}_mean_ms_per_step": round(1000 * statistics.mean(t), 2) for name, t in times.items()},
    }


def timed_generate(model, run) -> tuple[float, object]:
    """(seconds of run() after the model's first forward (the prefill) returned, run()'s result)."""
    stamps: list[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        result = run()
        end = time.perf_counter()
    finally:
        hook.remove()
    return end - stamps[0], result


def generate_check(ours, hf, config, batch, context, new_tokens, generator, repeats=3) -> dict:
    prompts = torch.randint(3, config.vocab_size, (batch, context), generator=generator)
    runs = {
        "moeray": (ours, lambda: ours.generate(prompts.tolist(), new_tokens)),
        "transformers": (hf, lambda: hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, pad_token_id=0)),
    }
    seconds, outputs = {name: [] for name in runs}, {}
    for _ in range(repeats):  # interleaved; best of `repeats` (the first run also warms up)
        for name, (model, run) in runs.items():
            elapsed, outputs[name] = timed_generate(model, run)
            seconds[name].append(elapsed)
    best = {name: min(s) for name, s in seconds.items()}
    cache = outputs["transformers"].past_key_values
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    tokens = batch * (new_tokens - 1)
    return {
        "generate_check": f"b{batch}_ctx{context}", "new_tokens": new_tokens,
        "tokens_equal": outputs["moeray"] == outputs["transformers"].sequences[:, context:].tolist(),
        **{f"{name}_tok_s": round(tokens / s, 2) for name, s in best.items()},
        "ratio": round(best["transformers"] / best["moeray"], 2),
        "transformers_cache_bytes_per_token": held // (batch * cache.get_seq_length()),
    }


def preset_cache(name: str) -> dict:
    c = DeepseekV2Config.preset(name)
    h, layers, bf16 = c.num_attention_heads, c.num_hidden_layers, 2
    latent = (c.kv_lora_rank + c.qk_rope_head_dim) * layers * bf16
    expanded = h * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * layers * bf16
    mha = 2 * h * c.qk_nope_head_dim * layers * bf16
    return {
        "preset_cache": name, "heads": h, "layers": layers, "kv_lora_rank": c.kv_lora_rank,
        "qk_rope_head_dim": c.qk_rope_head_dim, "qk_nope_head_dim": c.qk_nope_head_dim, "v_head_dim": c.v_head_dim,
        "latent_bytes_per_token_bf16": latent, "expanded_kv_bytes_per_token_bf16": expanded,
        "latent_vs_expanded_pct": round(100 * latent / expanded, 3),
        "mha_paper_bytes_per_token_bf16": mha, "latent_vs_mha_paper_pct": round(100 * latent / mha, 3),
        "matches_LatentCache_bytes_per_token": latent == LatentCache.bytes_per_token(c, torch.bfloat16),
    }


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mla_decode", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 at context 512 only, few tokens")
    parser.add_argument("--new-tokens", type=positive_int, default=None, help="decode steps per case (default 16)")
    parser.add_argument("--contexts", type=positive_ints, default=[512, 2048, 4096], help="batch-8 contexts")
    parser.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (5 if args.quick else 16)
    contexts = [512] if args.quick else args.contexts
    torch.set_num_threads(args.threads)
    config = DeepseekV2Config.preset("v2-lite", **BENCH_OVERRIDES)
    emit({
        "config": {k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
            "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "vocab_size", "first_k_dense_replace")},
        "base_preset": "v2-lite", "dtype": "float32", "threads": args.threads, "new_tokens": new_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__, "method": METHOD,
    })
    with tempfile.TemporaryDirectory() as folder:
        DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(folder)
        ours = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    generator = torch.Generator().manual_seed(0)
    check = generate_check(ours, hf, config, 1, 512, new_tokens, generator)  # also warms both up
    emit({"cache_bytes_per_token": {
        "moeray_latent_fp32": LatentCache.bytes_per_token(config, torch.float32),
        "transformers_dynamic_cache_fp32": check.pop("transformers_cache_bytes_per_token"),
        "expanded_kv_fp32": config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
        * config.num_hidden_layers * 4,
    }})
    emit(check)
    for batch, context in [(1, 512)] + [(8, ctx) for ctx in contexts]:
        emit(decode_case(ours, hf, config, batch, context, new_tokens, generator))
    for name in ("v2", "v2-lite"):
        emit(preset_cache(name))


if __name__ == "__main__":
    main()
