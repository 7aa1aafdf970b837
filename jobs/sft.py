"""Pretraining and supervised fine-tuning on the actor graph.

    python -m jobs.sft --config jobs/configs/arith-tiny.yaml [--resume] [--set steps=50 ...]
    ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/smoke.yaml

Embedded Ray by default (RAY_ADDRESS joins a running cluster; `ray job submit` sets it); with
expert_actors: 0 it trains in this one process without Ray. The run folder gets metrics.jsonl (one
line per step), training.png (loss curves and the expert-load heatmap), checkpoint-<step>/ folders
(Hugging Face layout + optimizer states + trainer_state.json) and `latest`. `--resume` continues from
the newest complete checkpoint: same weights, optimizer state, data position and RNG.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import yaml

from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.tokenizer import ChatTokenizer

from .config import RunConfig, TrainConfig, job_parser, run_job_command
from .data import TrainingData
from .progress import Progress
from .trainer import (
    STATE_FILE,
    Trainer,
    copy_tokenizer,
    export_model,
    latest_checkpoint,
    list_checkpoints,
    lost_an_actor,
    make_trainer,
    restore_training_state,
    save_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
RESULT_FILE = "result.json"
INIT_DIR = "init"
TOKENIZER_DIR = "tokenizer"


def log(message: str) -> None:
    print(f"[jobs.sft] {message}", file=sys.stderr, flush=True)


# ---- the model to start from ----------------------------------------------------------------------


def load_tokenizer(config: RunConfig, vocab_size: int | None) -> ChatTokenizer:
    if config.model.tokenizer == "bundled":
        return ChatTokenizer.bundled(vocab_size)
    return ChatTokenizer.from_pretrained(config.model.tokenizer)


def model_config(config: RunConfig) -> DeepseekV2Config:
    if config.model.init is not None:
        base = DeepseekV2Config.from_pretrained(config.model.init)
        data = {**base.model_dump(), **config.model.overrides}
    else:
        data = {**DeepseekV2Config.preset(config.model.preset).model_dump(), **config.model.overrides}
    return DeepseekV2Config.model_validate({**data, **config.moe.config_overrides()})


def write_init(config: RunConfig, directory: Path) -> Path:
    """The step-0 model folder every actor loads its slice from (random init, or a copy of `init`)."""
    cfg = model_config(config)
    if directory.exists():
        shutil.rmtree(directory)
    if config.model.init is not None:
        shutil.copytree(config.model.init, directory)
        cfg.save_pretrained(directory)  # with this run's balance-loss / dropping settings
    else:
        seed = config.seed if config.model.init_seed is None else config.model.init_seed
        DeepseekV2ForCausalLM(cfg).init_weights(seed=seed).save_pretrained(directory)
    if not (directory / "tokenizer.json").exists():
        load_tokenizer(config, cfg.vocab_size).save_pretrained(directory)
    if config.arith_task() is not None:
        (directory / "arith_task.json").write_text(config.arith_task().model_dump_json(indent=2) + "\n")
    return directory


# ---- metrics --------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON object per optimizer step. On resume, lines past the checkpoint's step
    (logged by the interrupted run after its last checkpoint) are dropped."""

    def __init__(self, path: Path, keep_through_step: int):
        self.path = path
        self.records: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if record.get("step", 0) <= keep_through_step:
                    self.records.append(record)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        os.replace(tmp, path)
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Loss curves (total, CE, balance losses) and the expert load per MoE layer over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not records:
        return
    steps = [r["step"] for r in records]
    layers = sorted(records[-1].get("expert_load", {}), key=int)
    fig, (ax_loss, ax_load) = plt.subplots(2, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [1, 1.2]})
    ax_loss.plot(steps, [r["loss"] for r in records], label="loss", lw=1)
    ax_loss.plot(steps, [r["ce"] for r in records], label="cross-entropy", lw=1)
    for name in ("balance_expert", "balance_device", "balance_comm"):
        if name in records[-1]:
            ax_loss.plot(steps, [r[name] for r in records], label=name.replace("_", " "), lw=1)
    ax_loss.set_yscale("log")
    ax_loss.set_xlabel("step")
    ax_loss.set_title("training loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)
    if layers:
        rows, labels = [], []
        for layer in layers:
            counts = np.array([r["expert_load"][layer] for r in records], dtype=float)  # [steps, E]
            share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
            for e in range(share.shape[1]):
                rows.append(share[:, e])
                labels.append(f"L{layer} e{e}")
        image = ax_load.imshow(np.array(rows), aspect="auto", interpolation="nearest", cmap="viridis",
                               extent=(steps[0] - 0.5, steps[-1] + 0.5, len(rows) - 0.5, -0.5))
        ax_load.set_yticks(range(len(rows)))
        ax_load.set_yticklabels(labels, fontsize=6)
        ax_load.set_xlabel("step")
        ax_load.set_title("expert load: share of each MoE layer's token assignments")
        fig.colorbar(image, ax=ax_load, fraction=0.03)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the training loop ----------------------------------------------------------------------------


def prepare_run_dir(config: RunConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder, with no half-written checkpoint in it; refuses to start over unless told to."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume and list_checkpoints(run_dir):
        if not overwrite:
            raise SystemExit(f"{run_dir} already has checkpoints: pass --resume, --overwrite or another run_dir")
        for _, path in list_checkpoints(run_dir):
            shutil.rmtree(path)
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    for stale in run_dir.glob("checkpoint-*.tmp"):  # left by a crash mid-write: never complete
        shutil.rmtree(stale, ignore_errors=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return run_dir


@dataclass
class Start:
    """Where a run starts: the model folder to load, the step, the data position, the checkpoint
    whose optimizer and RNG states to restore (None at step 0), and the run's own copy of the
    tokenizer files that every checkpoint gets (the folder it started from may be deleted by then)."""

    model_dir: Path
    step: int
    data_position: int
    checkpoint: Path | None
    tokenizer_dir: Path


def find_start(config: RunConfig, run_dir: Path, resume: bool, log: Callable[[str], None] = log) -> Start:
    """Where a run starts: its newest complete checkpoint when resuming, else the init model."""
    checkpoint = latest_checkpoint(run_dir) if resume else None
    tokenizer_dir = run_dir / TOKENIZER_DIR
    tokenizer_dir.mkdir(exist_ok=True)
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        log(f"resuming from {checkpoint} (step {state['step']}, data position {state['data_position']})")
        copy_tokenizer(checkpoint, tokenizer_dir)
        return Start(checkpoint, state["step"], state["data_position"], checkpoint, tokenizer_dir)
    if resume:
        log(f"no complete checkpoint in {run_dir}: starting from step 0")
    init = write_init(config, run_dir / INIT_DIR)
    copy_tokenizer(init, tokenizer_dir)
    return Start(init, 0, 0, None, tokenizer_dir)


def run_steps(
    config: TrainConfig,
    trainer: Trainer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor, int]],
    start: Start,
    run_dir: Path,
    metrics: MetricsLog,
) -> dict[str, Any]:
    """The optimizer steps from start.step to config.steps, a checkpoint every checkpoint_every."""
    progress = Progress("jobs.sft", config.steps, start.step) if config.progress else None
    started = time.perf_counter()
    trained_tokens = 0
    last_checkpoint = start.checkpoint
    for step in range(start.step, config.steps):
        input_ids, labels, position = next(batches)
        lr = config.schedule.lr_at(step, config.steps)
        t0 = time.perf_counter()
        record = trainer.step(step, input_ids, labels, lr)
        elapsed = time.perf_counter() - t0
        trained_tokens += record["tokens"]
        record = {"step": step + 1, "lr": lr, **record, "step_s": elapsed, "tokens_per_s": record["tokens"] / elapsed}
        metrics.write(record)
        if progress is not None:
            progress.update(step + 1, ce=record["ce"], loss=record["loss"], tokens_per_s=record["tokens_per_s"])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            last_checkpoint = save_checkpoint(trainer, run_dir, step + 1, position, start.tokenizer_dir)
            if config.plot:
                plot(metrics.records, run_dir / PLOT_FILE)
    if progress is not None:
        progress.close()
    wall = time.perf_counter() - started
    return {
        "steps": config.steps,
        "started_at_step": start.step,
        "train_seconds": round(wall, 2),
        "tokens_per_s": round(trained_tokens / wall, 1) if wall > 0 else None,
        "final_loss": metrics.records[-1]["loss"] if metrics.records else None,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
    }


def evaluate_and_export(config: TrainConfig, run_dir: Path, result: dict[str, Any]) -> None:
    """Held-out exact match of the final checkpoint (arithmetic task) and the export, into `result`."""
    final = Path(result["checkpoint"]) if result.get("checkpoint") else None
    if final is None:
        return
    if config.eval.arith_heldout > 0 and config.data.source == "arith":
        from .eval_arith import evaluate_folder

        evaluation = evaluate_folder(final, config.data.arith, config.eval.arith_heldout, config.eval.max_new_tokens)
        result["heldout_exact_match"] = evaluation["exact_match"]
        result["heldout_n"] = evaluation["n"]
        (run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        log(f"held-out exact match {evaluation['exact_match']:.4f} on {evaluation['n']} questions")
    if config.export_dir:
        export_model(final, Path(config.export_dir))
        if (run_dir / "eval.json").exists():
            (Path(config.export_dir) / "eval_results.json").write_text((run_dir / "eval.json").read_text())
        result["exported"] = config.export_dir


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The run, resumed from its newest complete checkpoint (on a new graph) when a process of its
    graph dies, up to config.max_failures times."""
    started = time.perf_counter()
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)
    run_dir = prepare_run_dir(config, resume, overwrite)
    start = find_start(config, run_dir, resume)
    data = TrainingData(config.data, ChatTokenizer.from_pretrained(start.model_dir), config.seq_len, config.seed)

    def attempt(start: Start) -> dict[str, Any]:
        trainer = make_trainer(config, start.model_dir)
        metrics = MetricsLog(run_dir / METRICS_FILE, keep_through_step=start.step)
        try:
            if start.checkpoint is not None:
                restore_training_state(trainer, start.checkpoint)
            batches = data.batches(config.batch_size, start.data_position)
            result = {"run_dir": str(run_dir), **run_steps(config, trainer, batches, start, run_dir, metrics)}
        finally:
            metrics.close()
            trainer.close()
        if config.plot:
            plot(metrics.records, run_dir / PLOT_FILE)
        return result

    result = resume_on_lost_actors(config, run_dir, start, attempt, log)
    evaluate_and_export(config, run_dir, result)
    return write_result(run_dir, result, started)


def write_result(run_dir: Path, result: dict[str, Any], started: float) -> dict[str, Any]:
    """result.json, with the job's wall time since `started` (graphs, steps, checkpoints, evaluation: every
    attempt) and the machine's load averages (1, 5, 15 min) as it ends."""
    result = {**result, "wall_seconds": round(time.perf_counter() - started, 1), "loadavg": os.getloadavg()}
    (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def resume_on_lost_actors(
    config: RunConfig,
    run_dir: Path,
    start: Start,
    attempt: Callable[[Start], dict[str, Any]],
    log: Callable[[str], None],
    lost: Callable[[BaseException], bool] = lost_an_actor,
) -> dict[str, Any]:
    """attempt(start); when a process of its graph dies (`lost` says whether an error means that), again
    from the newest complete checkpoint (on a new graph), up to config.max_failures times. The result
    says how many failures it survived."""
    failures = 0
    while True:
        try:
            return {**attempt(start), "failures": failures}
        except Exception as error:
            if not lost(error) or failures >= config.max_failures:
                raise
            failures += 1
            log(f"a process of the training graph died ({type(error).__name__}); resuming from the newest "
                f"complete checkpoint (failure {failures} of at most {config.max_failures})")
            start = find_start(config, run_dir, resume=True, log=log)


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m jobs.sft", "pretraining / SFT on the actor graph")


def main(argv: list[str] | None = None) -> int:
    return run_job_command(build_parser(), TrainConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
