"""GRPO: the objective by hand, routing replay in the model, the cache's routing record."""

from __future__ import annotations

import math

import pytest
import torch

from model import DeepseekV2ForCausalLM, LatentCache
from model.cache import CacheBatch
from model.grpo import GRPOSettings, group_advantages, grpo_objective, token_logprobs
from model.moe import routing_mismatch
from model.training import IGNORE_INDEX

from .reference import CONFIG_B, random_model


# ---- the objective, computed by hand ---------------------------------------------------------------

# Two prompts, G = 2 outputs each; output lengths 3, 2, 1, 3 (the rest of each row is padding).
REWARDS = [[1.0, 0.25], [0.0, 0.5]]
LENGTHS = [3, 2, 1, 3]
LOGPROBS = [[-0.5, -1.2, -0.1], [-2.0, -0.3, 0.0], [-0.7, 0.0, 0.0], [-1.5, -0.05, -0.9]]
OLD = [[-0.6, -0.9, -0.1], [-1.7, -0.35, 0.0], [-0.4, 0.0, 0.0], [-1.0, -0.2, -0.95]]
REF = [[-0.8, -1.0, -0.3], [-1.9, -0.5, 0.0], [-0.9, 0.0, 0.0], [-1.2, -0.1, -0.7]]
EPS, BETA = 0.2, 0.1


def by_hand() -> tuple[float, list[list[float]]]:
    """The GRPO loss (−J) and its gradient with respect to each log-prob, in plain Python floats."""
    advantages = []
    for group in REWARDS:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))  # unbiased
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    objective, grads = 0.0, [[0.0] * 3 for _ in LENGTHS]
    n = len(LENGTHS)
    for i, length in enumerate(LENGTHS):
        a, total = advantages[i], 0.0
        for t in range(length):
            ratio = math.exp(LOGPROBS[i][t] - OLD[i][t])
            clipped_ratio = min(max(ratio, 1 - EPS), 1 + EPS)
            surrogate = min(ratio * a, clipped_ratio * a)
            log_ref_ratio = REF[i][t] - LOGPROBS[i][t]
            kl = math.exp(log_ref_ratio) - log_ref_ratio - 1
            total += surrogate - BETA * kl
            # d/dlp of the surrogate: ratio·A, or 0 where the clipped term is the smaller; of −β·kl:
            # β·(π_ref/π − 1) (SPEC §5.1, eq. 20-21).
            d_surrogate = ratio * a if ratio * a <= clipped_ratio * a else 0.0
            d_objective = d_surrogate + BETA * (math.exp(log_ref_ratio) - 1)
            grads[i][t] = -d_objective / length / n
        objective += total / length
    return -objective / n, grads


def test_grpo_loss_and_gradient_equal_the_hand_computation():
    expected_loss, expected_grads = by_hand()
    mask = torch.tensor([[t < length for t in range(3)] for length in LENGTHS])
    logprobs = torch.tensor(LOGPROBS, dtype=torch.float64, requires_grad=True)
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float64)).flatten()
    settings = GRPOSettings(clip_eps=EPS, beta=BETA)
    terms = grpo_objective(logprobs, torch.tensor(OLD, dtype=torch.float64), advantages, mask, settings,
                           torch.tensor(REF, dtype=torch.float64))
    loss = -terms.objective.mean()
    loss.backward()
    assert float(loss.detach()) == pytest.approx(expected_loss, abs=1e-6)
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected_grads, dtype=torch.float64), atol=1e-6, rtol=0)
    assert bool(terms.clipped.any()) and not bool(terms.clipped.all())  # both branches of min are exercised
    assert not bool(terms.clipped[~mask].any()) and float(terms.kl.detach()[~mask].abs().sum()) == 0


def test_equal_rewards_give_zero_advantage_and_std_normalisation_is_optional():
    rewards = torch.tensor([[0.5, 0.5, 0.5], [0.0, 1.0, 2.0]])
    advantages = group_advantages(rewards)
    assert torch.equal(advantages[0], torch.zeros(3))
    torch.testing.assert_close(advantages[1], torch.tensor([-1.0, 0.0, 1.0]) / (1 + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, normalize_std=False)[1], torch.tensor([-1.0, 0.0, 1.0]))


def test_token_logprobs_are_the_temperature_1_log_softmax_and_zero_off_the_targets():
    logits = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1, IGNORE_INDEX, 6], [IGNORE_INDEX, 0, 2]])
    got = token_logprobs(logits, targets)
    expected = logits.log_softmax(-1)
    assert got[0, 0] == expected[0, 0, 1] and got[1, 2] == expected[1, 2, 2]
    assert got[0, 1] == 0 and got[1, 0] == 0


# ---- routing replay in the model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> DeepseekV2ForCausalLM:
    return random_model(CONFIG_B, seed=3)


def test_replaying_a_forwards_own_routing_gives_the_same_logits_and_the_gate_still_learns(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        free = model(ids)
        replayed = model(ids, routing=free.routing)
    assert free.routing.shape == (2, 9, len(model.config.moe_layers), model.config.num_experts_per_tok)
    torch.testing.assert_close(replayed.logits, free.logits, atol=0, rtol=0)
    assert torch.equal(replayed.routing, free.routing)

    other = free.routing.clone()
    other[:, :4] = free.routing[:, 4:8]  # another (valid) routing for the first 4 tokens
    other[1] = -1  # row 1: no record, the gate chooses
    with torch.no_grad():
        moved = model(ids, routing=other)
    assert not torch.allclose(moved.logits[0], free.logits[0])
    torch.testing.assert_close(moved.logits[1], free.logits[1], atol=0, rtol=0)
    assert torch.equal(moved.routing[0, :4], other[0, :4])

    gate = next(iter(model.moe_layers().values())).gate.weight
    model.zero_grad()
    model(ids, routing=other).logits.square().mean().backward()
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0


def test_routing_mismatch_ignores_the_order_of_a_tokens_experts():
    recorded = torch.tensor([[[[1, 2], [3, 4]], [[5, 6], [0, 1]]]])  # [1, 2 tokens, 2 layers, K=2]
    assert routing_mismatch(recorded.flip(-1), recorded).tolist() == [[False, False]]
    changed = recorded.clone()
    changed[0, 1, 1] = torch.tensor([0, 7])
    assert routing_mismatch(changed, recorded).tolist() == [[False, True]]


def test_the_latent_cache_records_each_tokens_routing(model):
    """Prefill then decode through the paged cache: the recorded routing is the full forward's."""
    ids = torch.randint(0, model.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    cache = LatentCache(model.config, num_blocks=4, block_size=4, record_routing=True)
    table = torch.tensor([[2, 0, 3]])
    with torch.no_grad():
        model(ids[:, :8], cache=cache, cache_batch=CacheBatch(table, torch.arange(8)[None]))
        for position in range(8, 11):
            model(ids[:, position : position + 1], cache=cache, cache_batch=CacheBatch(table, torch.tensor([[position]])))
        full = model(ids).routing[0]
    torch.testing.assert_close(cache.read_routing([2, 0, 3], 11), full, atol=0, rtol=0)
    cache.copy_blocks(torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(cache.read_routing([1], 4), full[4:8])
    assert int(cache.routing[3, 3].min()) == -1  # slot 12 was never written
