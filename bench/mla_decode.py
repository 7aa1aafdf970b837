"""MLA decode benchmark: moeray's weight-absorbed decode over the latent cache vs transformers.

    cd /work/main && PYTHONPATH=. timeout 900 python bench/mla_decode.py            # full run
    cd /work/main && PYTHONPATH=. timeout 900 python bench/mla_decode.py --quick    # smoke run

Prints JSON lines on stdout:
- "config": the benchmark model (V2-Lite's attention shapes, tiny everything else) and the method;
- "cache_bytes_per_token": ours (LatentCache.bytes_per_token) vs what transformers' DynamicCache holds;
- one line per case {"case", "batch", "context", "moeray_tok_s", "transformers_tok_s", "ratio", "tokens_equal"};
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
import tempfile
import time

import torch
import transformers

from model import DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache

# V2-Lite attention (16 heads, d_h 128, d_R 64, d_v 128, d_c 512, no q compression, YaRN ×40);
# small hidden size, 2 layers (one dense, one MoE), small experts and vocabulary.
BENCH_OVERRIDES = dict(
    hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=2,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, vocab_size=2048,
    bos_token_id=None, eos_token_id=None, pad_token_id=0,
)
METHOD = (
    "one generate() call per model and case, greedy, batch of equal-length random prompts; a forward hook "
    "stamps the end of the first forward (the prefill); decode time = generate wall time after the prefill "
    "forward returned (N-1 decode forwards plus sampling/cache bookkeeping); decode tokens = batch*(N-1); "
    "fp32, torch threads = available cores, one warm-up generate per model first"
)


def timed_generate(model, run) -> tuple[float, float, object]:
    """(total seconds, seconds after the first forward returned, run()'s result)."""
    stamps: list[float] = []
    hook = model.register_forward_hook(lambda *_: stamps.append(time.perf_counter()))
    try:
        start = time.perf_counter()
        result = run()
        end = time.perf_counter()
    finally:
        hook.remove()
    return end - start, end - stamps[0], result


def run_ours(model, prompts, new_tokens):
    return timed_generate(model, lambda: model.generate(prompts, new_tokens))


def run_hf(model, prompts, new_tokens):
    ids = torch.tensor(prompts)

    def run():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, return_dict_in_generate=True, pad_token_id=0,
        )

    total, decode, out = timed_generate(model, run)
    return total, decode, out


def hf_cache_bytes_per_token(out, batch: int) -> int:
    """Bytes the returned DynamicCache holds, per cached token (all layers)."""
    cache = out.past_key_values
    tokens = cache.get_seq_length()
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return held // (batch * tokens)


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
        "assertion": latent == LatentCache.bytes_per_token(c, torch.bfloat16),
    }


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8 at context 512 only, few tokens")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per generate (default 16)")
    parser.add_argument("--contexts", default="512,2048,4096", help="batch-8 contexts")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (6 if args.quick else 16)
    contexts = [512] if args.quick else [int(c) for c in args.contexts.split(",")]
    cases = [(1, 512)] + [(8, ctx) for ctx in contexts]

    threads = args.threads
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = DeepseekV2Config.preset("v2-lite", **BENCH_OVERRIDES)
    emit({
        "config": {k: getattr(config, k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
            "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "vocab_size", "first_k_dense_replace")},
        "base_preset": "v2-lite", "dtype": "float32", "threads": threads, "new_tokens": new_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__, "method": METHOD,
    })

    with tempfile.TemporaryDirectory() as folder:
        DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(folder)
        ours = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    warm = [[3, 4, 5, 6] * 8]
    run_ours(ours, warm, 3)
    _, _, out = run_hf(hf, warm, 3)
    emit({
        "cache_bytes_per_token": {
            "moeray_latent_fp32": LatentCache.bytes_per_token(config, torch.float32),
            "transformers_dynamic_cache_fp32": hf_cache_bytes_per_token(out, 1),
            "expanded_kv_fp32": config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
            * config.num_hidden_layers * 4,
        }
    })

    generator = torch.Generator().manual_seed(1)
    for batch, context in cases:
        prompts = torch.randint(3, config.vocab_size, (batch, context), generator=generator).tolist()
        ours_total, ours_decode, ours_tokens = run_ours(ours, prompts, new_tokens)
        hf_total, hf_decode, hf_out = run_hf(hf, prompts, new_tokens)
        hf_tokens = hf_out.sequences[:, context:].tolist()
        steps = batch * (new_tokens - 1)
        ours_tok_s, hf_tok_s = steps / ours_decode, steps / hf_decode
        emit({
            "case": f"b{batch}_ctx{context}", "batch": batch, "context": context,
            "moeray_tok_s": round(ours_tok_s, 2), "transformers_tok_s": round(hf_tok_s, 2),
            "ratio": round(ours_tok_s / hf_tok_s, 2), "tokens_equal": ours_tokens == hf_tokens,
            "moeray_prefill_s": round(ours_total - ours_decode, 3), "transformers_prefill_s": round(hf_total - hf_decode, 3),
            "moeray_decode_ms_per_step": round(1000 * ours_decode / (new_tokens - 1), 2),
            "transformers_decode_ms_per_step": round(1000 * hf_decode / (new_tokens - 1), 2),
        })

    for name in ("v2", "v2-lite"):
        emit(preset_cache(name))


if __name__ == "__main__":
    main()
