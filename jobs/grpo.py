"""GRPO (DeepSeekMath §4.1; SPEC §5) on the actor graph that serves and trains.

    python -m jobs.grpo --config jobs/configs/arith-tiny-grpo.yaml [--resume] [--set group_size=4 ...]
    moeray train grpo --config jobs/configs/arith-tiny-grpo.yaml
    ray job submit --working-dir . -- python -m jobs.grpo --config jobs/configs/grpo-smoke.yaml --run-dir /abs/path

One step: the step's prompts (a pure function of seed and step) go to the serving engine, running on
the training graph's routers and expert actors, for G answers each (n = G sharing the prompt's cache
blocks, a seed per prompt, so a run is reproducible); the rewards are scored and normalised within
each group; the reference's log-probs are computed on the same actors (β > 0); then μ passes of
optimizer steps update the policy in place, each token routed to the experts it had at rollout
(routing replay). The engine's cached prefixes are dropped after the update (they hold the old
policy's latents). Embedded Ray by default, RAY_ADDRESS or `ray job submit` to join a cluster.

The run folder is SFT's: metrics.jsonl (one line per step), training.png (rewards, KL, clipping, ...),
checkpoint-<step>/ (Hugging Face layout + optimizer states + the reference), `latest`, eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from engine.generation import EngineUnavailable
from model.grpo import PolicyBatch, group_advantages
from model.sampling import SamplingParams
from model.tokenizer import ChatTokenizer
from model.training import IGNORE_INDEX

from .config import job_parser, run_job_command
from .data import arith_answer, arith_conversations, arith_messages
from .eval_arith import evaluate_folder, heldout_problems
from .grpo_config import GRPOConfig
from .policy import GraphPolicy, Policy, policy_metrics
from .progress import Progress
from .rewards import Completion, Rewards
from .rollouts import RolloutSample, Rollouts
from .sft import (
    METRICS_FILE,
    PLOT_FILE,
    MetricsLog,
    Start,
    find_start,
    prepare_run_dir,
    resume_on_lost_actors,
    write_result,
)
from .trainer import GraphTrainer, export_model, lost_an_actor, restore_training_state, save_checkpoint, step_seed


def log(message: str) -> None:
    print(f"[jobs.grpo] {message}", file=sys.stderr, flush=True)


# ---- a step's prompts, rollouts and the batch the policy trains on ----------------------------------


def step_prompts(config: GRPOConfig, step: int) -> list[tuple[list[dict[str, str]], str]]:
    """The step's conversations and expected last answers: a pure function of (seed, step)."""
    task = config.task
    return arith_conversations(task.arith, "train", config.prompts_per_step, step_seed(config.seed, step, 0),
                               task.min_turns, task.max_turns)


def sampling_params(config: GRPOConfig, step: int, prompt: int) -> SamplingParams:
    """One prompt's sampling: its G answers are choices 0..G-1 of one seed (engine: per choice and
    position), so they do not depend on what else shares a batch."""
    s = config.sampling
    return SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, top_logprobs=0,
                          seed=step_seed(config.seed, step, 1 + prompt))


def policy_batch(samples: list[RolloutSample], advantages: torch.Tensor, pad_id: int) -> PolicyBatch:
    """Rows of prompt + response without its last token (right-padded); the targets, old log-probs and
    routing of every input token as the rollout recorded them."""
    rows = [s.prompt_ids + s.response_ids for s in samples]
    width = max(len(row) for row in rows) - 1
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    targets = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    old_logprobs = torch.zeros(n, width)
    routing = torch.full((n, width, *samples[0].routing.shape[1:]), -1, dtype=torch.long)  # -1: padding
    for i, (sample, row) in enumerate(zip(samples, rows)):
        length, first = len(row) - 1, len(sample.prompt_ids) - 1  # position `first` predicts the 1st answer token
        input_ids[i, :length] = torch.tensor(row[:-1])
        targets[i, first:length] = torch.tensor(sample.response_ids)
        old_logprobs[i, first:length] = torch.tensor(sample.logprobs)
        routing[i, :length] = sample.routing
    return PolicyBatch(input_ids=input_ids, targets=targets, old_logprobs=old_logprobs, advantages=advantages,
                       routing=routing)


def score(
    samples: list[list[RolloutSample]], prompts: list[tuple[list[dict[str, str]], str]], rewards: Rewards,
    tokenizer: ChatTokenizer,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Rewards [prompts, G] and each reward function's mean."""
    completions = [
        Completion(messages=messages, text=tokenizer.decode(s.response_ids), token_ids=s.response_ids,
                   finish_reason=s.finish_reason, expected=expected)
        for group, (messages, expected) in zip(samples, prompts)
        for s in group
    ]
    totals, means = rewards.score(completions)
    return torch.tensor(totals).view(len(samples), -1), means


# ---- one step ---------------------------------------------------------------------------------------


def grpo_step(config: GRPOConfig, step: int, rollouts: Rollouts, policy: Policy, rewards: Rewards,
              tokenizer: ChatTokenizer) -> dict[str, Any]:
    """Rollouts, rewards, advantages, reference log-probs, μ passes of updates; the step's metrics."""
    prompts = step_prompts(config, step)
    prompt_ids = [tokenizer.encode_chat(messages, add_generation_prompt=True) for messages, _ in prompts]
    started = time.perf_counter()
    samples = rollouts.sample(prompt_ids, config.group_size, config.sampling.max_new_tokens,
                              [sampling_params(config, step, i) for i in range(len(prompts))])
    rollout_s = time.perf_counter() - started
    reward, reward_means = score(samples, prompts, rewards, tokenizer)
    advantages = group_advantages(reward, config.normalize_std, config.advantage_eps).flatten()
    flat = [s for group in samples for s in group]
    trained = trained_outputs(reward, config.filter_groups)
    batch = policy_batch([flat[i] for i in trained], advantages[trained], tokenizer.pad_token_id)
    started = time.perf_counter()
    if policy.has_reference:
        batch = batch.model_copy(update={"ref_logprobs": policy.reference_logprobs(batch.input_ids, batch.targets)})
    update = update_policy(config, policy, batch, step)
    update_s = time.perf_counter() - started
    rollouts.invalidate_cache()  # every cached latent is the old policy's
    if config.reference_reset_every and (step + 1) % config.reference_reset_every == 0:
        policy.reset_reference()
    generated = sum(len(s.response_ids) for s in flat)
    return {
        "reward_mean": float(reward.mean()),
        "reward_std": float(reward.std()),
        **reward_means,
        "groups_without_signal": float((reward.std(dim=-1) == 0).float().mean()),
        "trained_outputs": len(trained) / len(flat),
        **update,
        "response_length": generated / len(flat),
        "rollout_s": rollout_s,
        "update_s": update_s,
        "rollout_tokens_per_s": generated / rollout_s,
        "update_tokens_per_s": update["update_tokens"] / update_s,
    }


def trained_outputs(reward: torch.Tensor, filter_groups: bool) -> torch.Tensor:
    """Indices of the outputs the update trains on: all, or with filter_groups those of groups whose
    rewards differ (an all-equal group has advantage 0 everywhere: it would only add the KL term);
    all again when no group has a signal."""
    varied = (reward.std(dim=-1) > 0).repeat_interleave(reward.shape[1])
    if not filter_groups or not bool(varied.any()):
        return torch.arange(reward.numel())
    return varied.nonzero().flatten()


def update_policy(config: GRPOConfig, policy: Policy, batch: PolicyBatch, step: int) -> dict[str, Any]:
    """μ passes over the batch, `minibatches` optimizer steps each. The first step's log-probs are
    compared with the rollout's (equal under routing replay: the ratio starts at exactly 1)."""
    lr = config.schedule.lr_at(step, config.steps)
    minibatches = min(config.minibatches, len(batch.input_ids))
    updates_per_step = config.updates_per_batch * minibatches
    order = torch.arange(len(batch.input_ids))
    first, metrics, grad_norms, tokens = None, [], [], 0
    for k in range(updates_per_step):
        rows = order.tensor_split(minibatches)[k % minibatches]
        minibatch = batch.rows(rows)
        update_index = step * config.updates_per_batch * config.minibatches + k  # unique: it seeds token dropping
        parts, grad_norm = policy.update(update_index, minibatch, lr)
        if first is None:
            response = minibatch.targets != IGNORE_INDEX
            logprobs = torch.cat([p.logprobs for p in parts])
            first = float((logprobs - minibatch.old_logprobs)[response].abs().max())
        metrics.append(policy_metrics(parts))
        grad_norms.append(grad_norm)
        tokens += minibatch.input_ids.numel()  # computed, padding included
    mean = {key: sum(m[key] for m in metrics) / len(metrics) for key in metrics[0]}
    return {**mean, "grad_norm": max(grad_norms), "lr": lr, "logprob_diff_max": first, "update_tokens": tokens}


# ---- evaluation: live on the engine during the run, from the checkpoint at the end ------------------


def evaluate_live(config: GRPOConfig, rollouts: Rollouts, tokenizer: ChatTokenizer) -> dict[str, float]:
    """Greedy exact match of the current policy through the engine: held-out conversations (last
    answer) and held-out single questions."""
    task, n = config.task, config.eval
    conversations = arith_conversations(task.arith, "heldout", n.conversations, 0, task.min_turns, task.max_turns)
    singles = [(arith_messages(*p, with_answer=False), arith_answer(*p)) for p in heldout_problems(task.arith, n.single_turn)]
    result = {}
    for name, pairs in (("eval_multi_turn", conversations), ("eval_single_turn", singles)):
        if not pairs:
            continue
        prompts = [tokenizer.encode_chat(messages, add_generation_prompt=True) for messages, _ in pairs]
        answers = rollouts.greedy(prompts, n.max_new_tokens)
        result[name] = sum(tokenizer.decode(a) == expected for a, (_, expected) in zip(answers, pairs)) / len(pairs)
    return result


def evaluate_checkpoint(config: GRPOConfig, checkpoint: Path) -> dict[str, Any]:
    """The final model, loaded from its folder in one process (no engine, no actors): the numbers the
    README reports."""
    task, n = config.task, config.eval
    multi = evaluate_folder(checkpoint, task.arith, n.conversations, n.max_new_tokens, (task.min_turns, task.max_turns))
    single = evaluate_folder(checkpoint, task.arith, n.single_turn, n.max_new_tokens)
    return {"multi_turn": multi, "single_turn": single}


# ---- the plot -------------------------------------------------------------------------------------


def plot(records: list[dict[str, Any]], path: Path) -> None:
    """Reward (mean ± std, and each function's mean) and the evaluations over the steps; KL, clipped
    share and entropy; response length and the routing mismatch rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated, records = records, [r for r in records if "reward_mean" in r]  # step 0: an evaluation only
    if not records:
        return
    steps = [r["step"] for r in records]
    fig, (ax_reward, ax_policy, ax_length) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    mean = [r["reward_mean"] for r in records]
    std = [r["reward_std"] for r in records]
    ax_reward.plot(steps, mean, label="reward (weighted sum)", lw=1.2)
    ax_reward.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    for key in sorted(k for k in records[-1] if k.startswith("reward_") and k not in ("reward_mean", "reward_std")):
        ax_reward.plot(steps, [r[key] for r in records], label=key.removeprefix("reward_"), lw=0.8)
    for key in ("eval_multi_turn", "eval_single_turn"):
        points = [(r["step"], r[key]) for r in evaluated if key in r]
        if points:
            ax_reward.plot(*zip(*points), "o-", label=f"{key.removeprefix('eval_')} (held-out, greedy)", ms=4)
    ax_reward.set_title("rewards of the sampled answers; held-out exact match")
    ax_reward.legend(fontsize=8)
    for key in ("kl", "clip_fraction", "entropy"):
        ax_policy.plot(steps, [r[key] for r in records], label=key, lw=1)
    ax_policy.set_yscale("symlog", linthresh=1e-3)
    ax_policy.legend(fontsize=8)
    ax_length.plot(steps, [r["response_length"] for r in records], label="response length (tokens)", lw=1)
    ax_length.plot(steps, [r["mismatch_rate"] for r in records], label="routing mismatch rate", lw=1)
    ax_length.set_xlabel("step")
    ax_length.legend(fontsize=8)
    for ax in (ax_reward, ax_policy, ax_length):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- the run --------------------------------------------------------------------------------------


def run_steps(config: GRPOConfig, start: Start, run_dir: Path, policy: Policy, rollouts: Rollouts,
              rewards: Rewards, tokenizer: ChatTokenizer, metrics: MetricsLog) -> dict[str, Any]:
    """GRPO steps from start.step to config.steps; a checkpoint every checkpoint_every, a live
    evaluation every eval.every (and before the first step of a fresh run)."""
    progress = Progress("jobs.grpo", config.steps, start.step) if config.progress else None
    if config.eval.every and start.step == 0:
        metrics.write({"step": 0, **evaluate_live(config, rollouts, tokenizer)})
    started = time.perf_counter()
    last_checkpoint = start.checkpoint
    for step in range(start.step, config.steps):
        t0 = time.perf_counter()
        record = {"step": step + 1, **grpo_step(config, step, rollouts, policy, rewards, tokenizer)}
        record["step_s"] = time.perf_counter() - t0
        if config.eval.every and (step + 1) % config.eval.every == 0:
            record.update(evaluate_live(config, rollouts, tokenizer))
        metrics.write(record)
        if progress is not None:
            progress.update(step + 1, reward=record["reward_mean"], kl=record["kl"])
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            write_reference = policy.save_reference if policy.has_reference else None
            last_checkpoint = save_checkpoint(policy.trainer, run_dir, step + 1, (step + 1) * config.prompts_per_step,
                                              start.tokenizer_dir, write_more=write_reference)
            if config.plot:
                plot(metrics.records, run_dir / PLOT_FILE)
    if progress is not None:
        progress.close()
    return {
        "steps": config.steps,
        "started_at_step": start.step,
        "train_seconds": round(time.perf_counter() - started, 2),
        "final_reward": metrics.records[-1].get("reward_mean") if metrics.records else None,
        "checkpoint": str(last_checkpoint) if last_checkpoint else None,
    }


def evaluate_and_export(config: GRPOConfig, run_dir: Path, result: dict[str, Any]) -> None:
    """Held-out exact match of the final checkpoint (multi-turn and single-turn) and the export."""
    final = Path(result["checkpoint"]) if result.get("checkpoint") else None
    if final is None:
        return
    if config.eval.conversations or config.eval.single_turn:
        evaluation = evaluate_checkpoint(config, final)
        (run_dir / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        for name, scores in evaluation.items():
            result[f"heldout_{name}"] = scores["exact_match"]
            log(f"held-out exact match, {name.replace('_', '-')}: {scores['exact_match']:.4f} on {scores['n']}")
    if config.export_dir:
        export = Path(config.export_dir)
        export_model(final, export)
        for name, target in (("eval.json", "eval_results.json"), (PLOT_FILE, PLOT_FILE)):
            if (run_dir / name).exists():
                (export / target).write_bytes((run_dir / name).read_bytes())
        result["exported"] = config.export_dir


def train(config: GRPOConfig, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """The run, resumed from its newest complete checkpoint (on a new graph) when a process of its
    graph dies, up to config.max_failures times."""
    started = time.perf_counter()
    run_dir = prepare_run_dir(config, resume, overwrite)
    start = find_start(config, run_dir, resume, log)
    tokenizer = ChatTokenizer.from_pretrained(start.tokenizer_dir)
    rewards = Rewards(config.rewards)

    def attempt(start: Start) -> dict[str, Any]:
        trainer = GraphTrainer(config, start.model_dir)
        metrics = MetricsLog(run_dir / METRICS_FILE, keep_through_step=start.step)
        rollouts = None
        try:
            policy = GraphPolicy(trainer, config.grpo)
            if start.checkpoint is not None:
                restore_training_state(trainer, start.checkpoint)
                if policy.has_reference:
                    policy.load_reference(start.checkpoint)
            rollouts = Rollouts(trainer.graph, config.engine, [tokenizer.eos_token_id])
            result = run_steps(config, start, run_dir, policy, rollouts, rewards, tokenizer, metrics)
        finally:
            metrics.close()
            if rollouts is not None:
                rollouts.close()
            trainer.close()
        if config.plot:
            plot(metrics.records, run_dir / PLOT_FILE)
        return {"run_dir": str(run_dir), **result}

    result = resume_on_lost_actors(config, run_dir, start, attempt, log, lost=lost_a_graph_process)
    evaluate_and_export(config, run_dir, result)
    return write_result(run_dir, result, started)


def lost_a_graph_process(error: BaseException) -> bool:
    """A process of the graph died: seen by the update (an actor error) or by the rollouts (the engine
    reports a router lost mid-request as EngineUnavailable; the training graph never restarts one)."""
    return lost_an_actor(error) or isinstance(error, EngineUnavailable)


def build_parser() -> argparse.ArgumentParser:
    return job_parser("python -m jobs.grpo", "GRPO on the actor graph (rollouts by the serving engine)")


def main(argv: list[str] | None = None) -> int:
    return run_job_command(build_parser(), GRPOConfig, train, argv)


if __name__ == "__main__":
    sys.exit(main())
