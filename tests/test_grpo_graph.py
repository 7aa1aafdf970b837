"""GRPO on the actor graph: the update equals the one-process update; rollouts replay their routing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.grpo_config import GRPOConfig
from jobs.policy import GraphPolicy, LocalPolicy, policy_metrics
from jobs.trainer import GraphTrainer, LocalTrainer
from model import DeepseekV2ForCausalLM
from model.checkpoint import load_tensors, tensor_files
from model.grpo import PolicyBatch, group_advantages, token_logprobs
from model.training import IGNORE_INDEX

from .training_helpers import init_folder, smoke_config


def grpo_config(folder: Path, *, beta: float = 0.1, routers: int = 1) -> GRPOConfig:
    return GRPOConfig.model_validate({
        "model": {"init": str(folder)}, "routers": routers, "expert_actors": 2, "grad_clip": 0.5,
        "grpo": {"clip_eps": 0.2, "beta": beta}, "group_size": 4, "progress": False,
    })


def fixed_batch(folder: Path, outputs: int = 8, prompt: int = 7, response: int = 5) -> PolicyBatch:
    """Rollouts made up around the model's own log-probs: ragged responses, old log-probs off by up to
    ±0.4 (so some ratios are clipped), routing recorded for every input token with a few tokens moved
    to other experts (so replay matters), advantages from random rewards in groups of 4."""
    generator = torch.Generator().manual_seed(0)
    model = DeepseekV2ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, model.config.vocab_size, (outputs, prompt + response), generator=generator)
    input_ids, targets = ids[:, :-1], ids[:, 1:].clone()
    lengths = torch.randint(1, response + 1, (outputs,), generator=generator)
    position = torch.arange(targets.shape[1])[None]
    targets[(position < prompt - 1) | (position >= prompt - 1 + lengths[:, None])] = IGNORE_INDEX
    with torch.no_grad():
        out = model(input_ids)
    logprobs = token_logprobs(out.logits, targets)
    noise = (torch.rand(logprobs.shape, generator=generator) - 0.5) * 0.8
    rewards = torch.rand(outputs // 4, 4, generator=generator)
    return PolicyBatch(
        input_ids=input_ids, targets=targets, old_logprobs=torch.where(targets != IGNORE_INDEX, logprobs + noise, 0.0),
        advantages=group_advantages(rewards).flatten(), routing=moved_routing(out.routing, model.config.n_routed_experts),
    )


def moved_routing(routing: torch.Tensor, n_experts: int, share: float = 0.2) -> torch.Tensor:
    """The routing with about `share` of the recorded tokens sent to other experts (expert + 1)."""
    moved = routing.clone()
    chosen = (torch.rand(routing.shape[:2], generator=torch.Generator().manual_seed(1)) < share) & (routing[..., 0, 0] >= 0)
    moved[chosen] = (routing[chosen] + 1) % n_experts
    return moved


def two_updates(policy, batch: PolicyBatch) -> list[dict]:
    """Update, reference log-probs (now different from the policy's), update again with them."""
    metrics = []
    for step in range(2):
        ref = policy.reference_logprobs(batch.input_ids, batch.targets)
        parts, grad_norm = policy.update(step, batch.model_copy(update={"ref_logprobs": ref}), lr=3e-3)
        metrics.append({**policy_metrics(parts), "grad_norm": grad_norm, "ref": ref,
                        "logprobs": torch.cat([p.logprobs for p in parts])})
    return metrics


@pytest.mark.timeout(400)
def test_a_grpo_step_on_the_actor_graph_equals_one_process(ray_cluster, tmp_path):
    """2 routers: each rank's gradients reach the others through the overlapped all-reduce."""
    folder = init_folder(smoke_config(tmp_path, "moe.capacity_factor=null"), tmp_path / "init")
    config = grpo_config(folder, routers=2)
    batch = fixed_batch(folder)

    local = LocalPolicy(LocalTrainer(config.model_copy(update={"routers": 1}), folder), config.grpo)
    expected = two_updates(local, batch)
    trainer = GraphTrainer(config, folder, name="grpo-equivalence")
    try:
        got = two_updates(GraphPolicy(trainer, config.grpo), batch)
        out = tmp_path / "after"
        out.mkdir()
        trainer.save(out)
    finally:
        trainer.close()

    assert expected[0]["clip_fraction"] > 0 and expected[1]["kl"] > 0  # clipping and the KL are exercised
    assert expected[0]["grad_norm"] > config.grad_clip  # so is the clip of the global norm
    for mine, theirs in zip(got, expected):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        for key in ("kl", "clip_fraction", "ratio_mean", "entropy", "grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-5), key
        torch.testing.assert_close(mine["ref"], theirs["ref"], atol=1e-5, rtol=0)
        torch.testing.assert_close(mine["logprobs"], theirs["logprobs"], atol=1e-5, rtol=0)
    weights = load_tensors(out, tensor_files(out))
    reference = {n: t.detach() for n, t in local.trainer.model.state_dict().items()}
    assert set(weights) == set(reference)
    initial = load_tensors(folder, weights)
    for name, tensor in weights.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-5, rtol=0, msg=name)
        assert not torch.equal(tensor, initial[name]) or tensor.dim() == 1, f"{name} did not move"


@pytest.mark.timeout(400)
def test_rollouts_record_routing_replay_makes_the_first_update_start_at_the_rollouts_logprobs(ray_cluster, tmp_path):
    """Rollouts by the engine on 1 router + 2 expert actors. Replay off: the logged mismatch rate is
    the share of tokens whose top-k set the update's forward changes (counted here in one process).
    Replay on: the first update's log-probs are the rollout's (to 1e-5)."""
    from jobs.grpo import policy_batch, sampling_params, step_prompts
    from jobs.rollouts import Rollouts
    from model.grpo import GRPOSettings
    from model.moe import routing_mismatch
    from model.tokenizer import ChatTokenizer

    folder = init_folder(smoke_config(tmp_path, "moe.capacity_factor=null"), tmp_path / "init")
    config = grpo_config(folder, beta=0.0).model_copy(update={"prompts_per_step": 4})
    tokenizer = ChatTokenizer.from_pretrained(folder)
    prompts = [tokenizer.encode_chat(m, add_generation_prompt=True) for m, _ in step_prompts(config, 0)]
    trainer = GraphTrainer(config, folder, name="grpo-replay")
    rollouts = Rollouts(trainer.graph, config.engine, [tokenizer.eos_token_id])
    try:
        params = [sampling_params(config, 0, i) for i in range(len(prompts))]
        samples = [s for group in rollouts.sample(prompts, config.group_size, 6, params) for s in group]
        batch = policy_batch(samples, torch.linspace(-1, 1, len(samples)), tokenizer.pad_token_id)
        experts = DeepseekV2ForCausalLM.from_pretrained(folder).config.n_routed_experts
        moved = batch.model_copy(update={"routing": moved_routing(batch.routing, experts)})  # a record that disagrees
        free = GraphPolicy(trainer, GRPOSettings(beta=0.0, routing_replay=False))
        parts, _ = free.update(0, moved, lr=0.0)  # lr 0: the weights stay the rollout's
        replayed = GraphPolicy(trainer, GRPOSettings(beta=0.0, routing_replay=True))
        replayed_parts, _ = replayed.update(1, batch, lr=1e-3)
    finally:
        rollouts.close()
        trainer.close()

    assert sum(len(s.response_ids) for s in samples) > len(samples)  # answers of several tokens
    recorded = batch.routing[..., 0, 0] >= 0
    assert int(recorded.sum()) == sum(len(s.prompt_ids) + len(s.response_ids) - 1 for s in samples)
    with torch.no_grad():
        chosen = DeepseekV2ForCausalLM.from_pretrained(folder)(batch.input_ids).routing
    expected = float(routing_mismatch(chosen, moved.routing)[recorded].float().mean())
    assert 0.05 < expected < 0.95  # the moved tokens, and only those the gate would not choose anyway
    assert policy_metrics(parts)["mismatch_rate"] == pytest.approx(expected, abs=1.5 / int(recorded.sum()))
    response = batch.targets != IGNORE_INDEX
    logprobs = torch.cat([p.logprobs for p in replayed_parts])
    torch.testing.assert_close(logprobs[response], batch.old_logprobs[response], atol=1e-5, rtol=0)
    assert policy_metrics(replayed_parts)["mismatch_rate"] == 0.0
