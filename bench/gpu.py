"""The GPU check, for a CUDA machine (elsewhere it exits with status 3 and "no CUDA device").

    RAY_AUTH_MODE=disabled python -m bench.gpu [--layers 4] [--new-tokens 128]

1. One process, DeepSeek-V2-Lite's shapes (random weights, `--layers` decoder layers, bf16): decode
   tokens/s of our generate (absorbed MLA over the latent cache) against transformers' generate on the
   same GPU and the same weights, and as a fraction of the memory-bandwidth roofline at batch 1 (the
   bytes one decode step must read: every weight but the experts a token does not use, plus its
   cache, at the device-to-device copy bandwidth measured here). Greedy tokens are compared in fp32
   (TF32 off), where both implementations must agree exactly.
2. A router and 2 expert actors sharing the one GPU (fractional GPUs) on both transports: the same
   greedy tokens as the CPU path in one process (fp32).
3. Training on that GPU: one optimizer step of 2 routers (data-parallel ranks; gloo, since they share
   the GPU) and 2 expert actors, given the GPU by the job's default (`gpus_per_actor` None), against
   the same step in one process on the CPU (fp32): the loss and every weight after it.

Prints JSON lines; exits 1 when any comparison fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch

from bench.args import positive_int
from model import DeepseekV2Config, DeepseekV2ForCausalLM

NO_CUDA_STATUS = 3
PARTS = ["decode", "graph", "train"]  # the numbered checks above, in order


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 1024**3) -> float:
    """Bytes per second of a device-to-device copy (read + write), the best of five."""
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        started = time.perf_counter()
        target.copy_(source)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * nbytes / best


def decode_bytes(model: DeepseekV2ForCausalLM, context: int) -> int:
    """What one batch-1 decode step reads: all weights except the routed experts a token skips, and
    the latent cache of `context` tokens."""
    config = model.config
    element = next(model.parameters()).element_size()
    expert = 3 * config.hidden_size * config.moe_intermediate_size * element
    skipped = len(config.moe_layers) * (config.n_routed_experts - config.num_experts_per_tok) * expert
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - skipped
    return weights + context * config.latent_dim * config.num_hidden_layers * element


def timed(run) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def one_process(folder: str, config: DeepseekV2Config, new_tokens: int, device: torch.device) -> bool:
    import transformers

    prompt = torch.randint(3, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        ours = DeepseekV2ForCausalLM.from_pretrained(folder, dtype, device)
        theirs = transformers.DeepseekV2ForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()

        def ours_generate(n: int) -> list[int]:
            return ours.generate(prompt.tolist(), n)[0]

        def theirs_generate(n: int) -> list[int]:
            out = theirs.generate(prompt.to(device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[0, prompt.shape[1]:].tolist()

        row = {"dtype": str(dtype).removeprefix("torch.")}
        for name, generate in (("ours", ours_generate), ("transformers", theirs_generate)):
            generate(2)  # warm-up
            tokens = []
            first = timed(lambda: generate(1))
            whole = timed(lambda: tokens.extend(generate(new_tokens)))
            row[name] = {"tokens": tokens, "decode_tok_s": round((new_tokens - 1) / (whole - first), 1)}
        results[row["dtype"]] = row
        if dtype == torch.bfloat16:
            bandwidth = copy_bandwidth(device)
            step_bytes = decode_bytes(ours, prompt.shape[1] + new_tokens // 2)
            roofline = bandwidth / step_bytes
            emit(kind="decode", dtype="bfloat16", batch=1, ours_tok_s=row["ours"]["decode_tok_s"],
                 transformers_tok_s=row["transformers"]["decode_tok_s"], copy_bandwidth_gb_s=round(bandwidth / 1e9, 1),
                 bytes_per_step=step_bytes, roofline_tok_s=round(roofline, 1),
                 fraction_of_roofline=round(row["ours"]["decode_tok_s"] / roofline, 3),
                 tokens_equal_bf16=row["ours"]["tokens"] == row["transformers"]["tokens"])  # fmt: skip
        del ours, theirs
        torch.cuda.empty_cache()
    equal = results["float32"]["ours"]["tokens"] == results["float32"]["transformers"]["tokens"]
    emit(kind="tokens", dtype="float32", new_tokens=new_tokens, equal=equal)
    return equal


def shared_gpu_graph(folder: str) -> bool:
    import ray

    from cluster.graph import NAMESPACE, ActorGraph
    from cluster.spec import ClusterSpec

    prompts = [[5, 9, 3, 17], [7, 1, 4, 4, 8, 2, 6, 30, 31], [11]]
    expected = DeepseekV2ForCausalLM.from_pretrained(folder).generate(prompts, 16)  # the CPU path, fp32
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, namespace=NAMESPACE)
    equal = True
    try:
        graph = ActorGraph.create(ClusterSpec(model=folder, name="gpu-check", expert_actors=2, gpus_per_actor=0.3,
                                              cpus_per_actor=1, dtype="float32"))  # fmt: skip
        try:
            devices = sorted({ray.get(a.ready.remote())["device"] for a in [*graph.routers, *graph.experts]})
            for transport in ("objectstore", "compiled"):
                ray.get(graph.routers[0].set_transport.remote(transport))
                same = ray.get(graph.routers[0].generate.remote(prompts, 16)) == expected
                emit(kind="shared_gpu_graph", transport=transport, devices=devices, tokens_equal_cpu=same)
                equal &= same
            ray.get(graph.routers[0].set_transport.remote("objectstore"))
        finally:
            graph.teardown()
    finally:
        ray.shutdown()
    return equal


def graph_training_step(folder: Path) -> bool:
    import ray

    from cluster.graph import NAMESPACE
    from jobs.config import load_config
    from jobs.data import TrainingData
    from jobs.sft import write_init
    from jobs.trainer import GraphTrainer, LocalTrainer
    from model.checkpoint import load_tensors, tensor_files
    from model.tokenizer import ChatTokenizer

    smoke = Path(__file__).parents[1] / "jobs/configs/smoke.yaml"
    config = load_config(smoke, [f"run_dir={folder / 'run'}", "routers=2", "moe.capacity_factor=null"])
    init = write_init(config, folder / "init")
    rows = TrainingData(config.data, ChatTokenizer.from_pretrained(init), config.seq_len, config.seed)
    input_ids, labels, _ = next(rows.batches(config.batch_size))
    saved = {side: folder / side for side in ("cpu", "gpu")}
    for directory in saved.values():
        directory.mkdir(parents=True)
    local = LocalTrainer(config, init)
    losses = {"cpu": local.step(0, input_ids, labels, 3e-3)["loss"]}
    local.save(saved["cpu"])
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False, namespace=NAMESPACE)
    try:
        trainer = GraphTrainer(config, init, name="gpu-train")
        try:
            devices = sorted({ray.get(a.ready.remote())["device"] for a in [*trainer.routers, *trainer.experts]})
            losses["gpu"] = trainer.step(0, input_ids, labels, 3e-3)["loss"]
            trainer.save(saved["gpu"])
        finally:
            trainer.close()
    finally:
        ray.shutdown()
    cpu, gpu = (load_tensors(directory, tensor_files(directory)) for directory in saved.values())
    weight_diff = max(float((cpu[name] - gpu[name].cpu()).abs().max()) for name in cpu)
    same = set(cpu) == set(gpu) and abs(losses["cpu"] - losses["gpu"]) < 1e-4 and weight_diff < 1e-4
    emit(kind="graph_training_step", devices=devices, routers=2, expert_actors=2, loss_cpu=losses["cpu"],
         loss_gpu=losses["gpu"], max_weight_diff=weight_diff, equal_to_1e_4=same)  # fmt: skip
    return same


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=4, help="decoder layers of the V2-Lite-shaped model")
    parser.add_argument("--new-tokens", type=positive_int, default=128)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which checks to run (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device: this check needs a GPU machine", file=sys.stderr)
        return NO_CUDA_STATUS
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda", 0)
    emit(kind="context", gpu=torch.cuda.get_device_name(device), torch=torch.__version__, layers=args.layers)
    equal = True
    with tempfile.TemporaryDirectory(prefix="moeray-bench-gpu-") as scratch:
        if "decode" in args.parts:
            folder, config = f"{scratch}/v2-lite", DeepseekV2Config.preset("v2-lite", num_hidden_layers=args.layers)
            DeepseekV2ForCausalLM(config.model_copy(update={"initializer_range": 0.02})).init_weights(0).save_pretrained(folder)
            equal &= one_process(folder, config, args.new_tokens, device)
        if "graph" in args.parts:
            tiny = f"{scratch}/tiny"
            DeepseekV2ForCausalLM(DeepseekV2Config.preset("tiny", initializer_range=0.1)).init_weights(seed=11).save_pretrained(tiny)
            equal &= shared_gpu_graph(tiny)
        if "train" in args.parts:
            equal &= graph_training_step(Path(scratch) / "train")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
