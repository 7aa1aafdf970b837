"""DeepSeekMoE: routing, balance losses, token dropping, layer layout, gradients through the backend."""

import pytest
import torch

from model import DeepseekV2ForCausalLM
from model.moe import DeepseekMoE, ExpertBackend, MoEGate, PendingExperts, balance_losses, capacity_mask

from .reference import CONFIG_A, CONFIG_B, hf_model, random_model


def test_balance_losses_equal_hand_computation():
    # One sequence of 2 tokens, 4 experts in 2 devices ({0,1}, {2,3}), top-2, at most 1 device per token.
    scores = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.35, 0.15, 0.4]]])
    expert_ids = torch.tensor([[[0, 1], [3, 1]]])
    losses = balance_losses(scores, expert_ids, n_devices=2, devices_per_token=1)
    # f = 4/(2·2)·[1,2,0,1] = [1,2,0,1];  P = [0.25, 0.325, 0.175, 0.25]
    assert losses.expert.item() == pytest.approx(1 * 0.25 + 2 * 0.325 + 0 + 1 * 0.25)
    # f' = [1.5, 0.5];  P' = [0.575, 0.425]
    assert losses.device.item() == pytest.approx(1.5 * 0.575 + 0.5 * 0.425)
    # token 0 reaches device 0, token 1 both: f'' = 2/(1·2)·[2, 1];  P'' = P'
    assert losses.comm.item() == pytest.approx(2 * 0.575 + 1 * 0.425)
    # A batch averages its sequences.
    twice = balance_losses(scores.repeat(2, 1, 1), expert_ids.repeat(2, 1, 1), 2, 1)
    assert twice.expert.item() == pytest.approx(losses.expert.item())


def test_token_dropping_keeps_highest_affinity_within_capacity():
    # 4 tokens, top-1, all routed to device 0 (experts 0, 1) of 2; capacity = ceil(1.0·4/2) = 2.
    expert_ids = torch.tensor([[0], [1], [0], [1]])
    affinity = torch.tensor([[0.9], [0.5], [0.7], [0.6]])
    none_exempt = torch.zeros(4, dtype=torch.bool)
    kept = capacity_mask(affinity, expert_ids, n_experts=4, n_devices=2, capacity_factor=1.0, exempt=none_exempt)
    assert kept.flatten().tolist() == [True, False, True, False]
    # An exempt token is never dropped and takes its share of the capacity first.
    exempt = torch.tensor([False, True, False, False])
    kept = capacity_mask(affinity, expert_ids, n_experts=4, n_devices=2, capacity_factor=1.0, exempt=exempt)
    assert kept.flatten().tolist() == [True, True, False, False]
    # A generous capacity drops nothing.
    kept = capacity_mask(affinity, expert_ids, n_experts=4, n_devices=2, capacity_factor=2.0, exempt=none_exempt)
    assert kept.all()


def test_group_limited_routing_stays_within_topk_group():
    gate = MoEGate(CONFIG_B)
    torch.nn.init.normal_(gate.weight, std=1.0)
    x = torch.randn(256, CONFIG_B.hidden_size, generator=torch.Generator().manual_seed(0))
    routing = gate(x)
    group_size = CONFIG_B.n_routed_experts // CONFIG_B.n_group
    groups_per_token = [len(set((ids // group_size).tolist())) for ids in routing.expert_ids]
    assert max(groups_per_token) <= CONFIG_B.topk_group
    # Weights are the raw softmax probabilities times routed_scaling_factor, not renormalised.
    raw = routing.scores.gather(1, routing.expert_ids)
    torch.testing.assert_close(routing.weights, raw * CONFIG_B.routed_scaling_factor)


def test_norm_topk_prob_follows_the_remote_code():
    gate = MoEGate(CONFIG_B.model_copy(update={"norm_topk_prob": True}))
    torch.nn.init.normal_(gate.weight, std=1.0)
    routing = gate(torch.randn(32, CONFIG_B.hidden_size))
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(32))  # renormalised, and not scaled by 16


def test_moe_layer_freq_as_the_remote_code_does_it():
    config = CONFIG_A.model_copy(update={"num_hidden_layers": 4, "moe_layer_freq": 2})
    model = DeepseekV2ForCausalLM(config)
    assert [isinstance(layer.mlp, DeepseekMoE) for layer in model.model.layers] == [False, False, True, False]
    assert sorted(model.moe_layers()) == config.moe_layers == [2]


def test_training_forward_returns_each_weighted_balance_loss():
    alphas = {"expert": 0.003, "device": 0.05, "comm": 0.02}
    config = CONFIG_B.model_copy(
        update={"aux_loss_alpha": 0.003, "device_aux_loss_alpha": 0.05, "comm_aux_loss_alpha": 0.02}
    )
    model = DeepseekV2ForCausalLM(config).init_weights(seed=0).train()
    seen = []
    model.moe_layers()[1].register_forward_hook(lambda module, args, output: seen.append(output.balance))
    ids = torch.randint(0, config.vocab_size, (2, 16))
    out = model(ids)
    assert set(out.balance_losses) == set(alphas)
    for name, alpha in alphas.items():
        raw = getattr(seen[0], name)
        assert raw.item() > 0
        torch.testing.assert_close(out.balance_losses[name], alpha * raw)
    assert out.balance_losses["expert"].requires_grad  # they train the gate
    assert model.eval()(ids).balance_losses == {}


def test_dropped_assignments_are_not_dispatched():
    config = CONFIG_B.model_copy(update={"capacity_factor": 0.5, "drop_exempt_fraction": 0.0})
    model = DeepseekV2ForCausalLM(config).init_weights(seed=0).train()
    out = model(torch.randint(0, config.vocab_size, (2, 32)))
    per_expert = out.tokens_per_expert[1]
    group_load = per_expert.view(config.n_group, -1).sum(-1)
    capacity = -(-0.5 * 2 * 32 * config.num_experts_per_tok // config.n_group)
    assert group_load.max() <= capacity
    assert per_expert.sum() < 2 * 32 * config.num_experts_per_tok


@pytest.mark.parametrize("config", [CONFIG_A, CONFIG_B], ids=["A", "B"])
def test_gradients_through_the_expert_backend_equal_transformers(config, tmp_path):
    reference = hf_model(config).train()
    reference.save_pretrained(tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path).train()
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(2, 12, config.vocab_size, generator=torch.Generator().manual_seed(1))
    (reference(ids).logits * weights).sum().backward()
    (ours(ids).logits * weights).sum().backward()

    expected = {}
    for name, param in reference.named_parameters():
        if name.endswith("experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            for e, grad in enumerate(param.grad):
                gate, up = grad.chunk(2)
                expected[f"{prefix}{e}.gate_proj.weight"] = gate
                expected[f"{prefix}{e}.up_proj.weight"] = up
        elif name.endswith("experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e, grad in enumerate(param.grad):
                expected[f"{prefix}{e}.down_proj.weight"] = grad
        else:
            expected[name] = param.grad
    got = {name: param.grad for name, param in ours.named_parameters()}
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        reference_grad = expected[name]
        if grad is None or reference_grad is None:  # an expert no token chose
            assert not any(g is not None and g.any() for g in (grad, reference_grad)), name
            continue
        # fp32 gradients reach ~100 here; compare at 1e-5 of each tensor's scale.
        scale = reference_grad.abs().max().item()
        torch.testing.assert_close(grad, reference_grad, atol=1e-5 * max(scale, 1.0), rtol=0, msg=name)
    assert ours.moe_layers()[1].backend.pending_backwards == 0


class _RecordedTrip(PendingExperts):
    def __init__(self, layer: int, inner: PendingExperts, events: list):
        self.layer, self.inner, self.events = layer, inner, events

    def result(self):
        return self.inner.result()

    def start_backward(self, grad_outputs):
        self.events.append(("send", self.layer))
        self.inner.start_backward(grad_outputs)

    def grad_tokens(self):
        self.events.append(("wait", self.layer))
        return self.inner.grad_tokens()


class _RecordingBackend(ExpertBackend):
    def __init__(self, inner: ExpertBackend, events: list):
        self.inner, self.events = inner, events

    def submit(self, layer, tokens, counts, token_index, keep_for_backward):
        return _RecordedTrip(layer, self.inner.submit(layer, tokens, counts, token_index, keep_for_backward), self.events)


def test_backward_awaits_the_experts_only_after_the_layers_other_backward():
    """Remote experts compute their backward while the router computes the rest of the layer's: each
    MoE layer sends the outputs' gradients first and waits for the tokens' gradients last, after the
    shared experts' and the gate's backward."""
    model = random_model(CONFIG_B).train()
    events: list[tuple[str, int]] = []
    layers = model.moe_layers()
    model.set_expert_backend(_RecordingBackend(next(iter(layers.values())).backend, events))
    for layer, moe in layers.items():
        for name, param in (("shared", moe.shared_experts.gate_proj.weight), ("gate", moe.gate.weight)):
            param.register_post_accumulate_grad_hook(lambda _, name=name, layer=layer: events.append((name, layer)))
    ids = torch.randint(0, CONFIG_B.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    model(ids).logits.sum().backward()
    for layer in layers:
        order = [name for name, at in events if at == layer]
        assert order[0] == "send" and order[-1] == "wait" and sorted(order[1:-1]) == ["gate", "shared"], order
