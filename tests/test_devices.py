"""Device and dtype plumbing, exercised on the CPU: every tensor of the router <-> expert exchange is
put on the device (and in the dtype) its receiver names. The meta device stands in for a GPU: mixing
it with CPU tensors raises, so a tensor that skipped its move fails these tests."""

import pytest
import ray
import torch

from actors.devices import on_distinct_gpus
from actors.expert import ExpertActor
from actors.wire import from_wire, to_wire
from model import DeepseekV2Config, DeepseekV2ForCausalLM, LocalExperts

from .test_actor_graph import PROMPTS, make_graph

META = torch.device("meta")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_messages_arrive_on_the_receivers_device_in_their_dtype(dtype):
    sent = torch.randn(5, 8).to(dtype)
    message = to_wire(sent)
    assert from_wire(message, torch.device("cpu")).equal(sent)
    arrived = from_wire(message, META)
    assert (arrived.device, arrived.dtype, arrived.shape) == (META, dtype, sent.shape)


def test_expert_slices_load_straight_onto_their_device(tiny_checkpoints):
    folder = tiny_checkpoints["B"]
    config = DeepseekV2Config.from_pretrained(folder)
    layer = config.moe_layers[0]
    on_meta = LocalExperts.from_pretrained(str(folder), config, {layer: [0, 3]}, torch.bfloat16, META)
    assert {(p.device, p.dtype) for p in on_meta.named_parameters().values()} == {(META, torch.bfloat16)}
    on_cpu = LocalExperts.from_pretrained(str(folder), config, {layer: [0, 3]})
    whole = DeepseekV2ForCausalLM.from_pretrained(folder).state_dict()
    for name, param in on_cpu.named_parameters().items():
        assert param.equal(whole[name]), name


def test_an_expert_actor_computes_on_its_device_and_answers_in_the_tokens_dtype(tiny_checkpoints):
    folder = str(tiny_checkpoints["B"])
    config = DeepseekV2Config.from_pretrained(folder)
    layer, experts = config.moe_layers[0], {config.moe_layers[0]: list(range(config.n_routed_experts))}
    tokens, counts = torch.randn(6, config.hidden_size), [2, 0, 4] + [0] * (config.n_routed_experts - 3)
    expert_meta = ExpertActor(folder, 0, experts, dtype="bfloat16", device=META)
    answer = expert_meta._forward(layer, tokens, counts)  # CPU tokens in: moved to the actor's device
    assert (answer.device, answer.dtype) == (META, torch.float32)

    fp32 = ExpertActor(folder, 0, experts, dtype="float32", device=torch.device("cpu"))
    bf16 = ExpertActor(folder, 0, experts, dtype="bfloat16", device=torch.device("cpu"))
    exact = from_wire(fp32.forward(layer, to_wire(tokens), counts)[0], torch.device("cpu"))
    rounded = from_wire(bf16.forward(layer, to_wire(tokens), counts)[0], torch.device("cpu"))
    assert rounded.dtype == torch.float32  # the router's dtype, whatever the experts compute in
    torch.testing.assert_close(rounded, exact, atol=0.05 * float(exact.abs().max()), rtol=0.05)


@pytest.mark.timeout(600)
def test_a_bf16_graph_matches_the_bf16_model_in_one_process(ray_cluster, tiny_checkpoints):
    folder = tiny_checkpoints["B"]
    expected = DeepseekV2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).generate(PROMPTS, 8)
    graph = make_graph(folder, "bf16", 2, dtype="bfloat16")
    try:
        described = [ray.get(a.ready.remote()) for a in [*graph.routers, *graph.experts]]
        assert {(d["device"], d["dtype"]) for d in described} == {("cpu", "bfloat16")}
        assert ray.get(graph.routers[0].generate.remote(PROMPTS, 8)) == expected
    finally:
        graph.teardown()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the whole check instead")
def test_the_gpu_check_exits_clearly_without_cuda():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "bench.gpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stderr.strip() == "bench.gpu: no CUDA device: this check needs a GPU machine"
    assert done.stdout == ""


def test_nccl_only_between_actors_with_gpus_of_their_own():
    def actor(node: str, gpus: list[int], device: str = "cuda:0") -> dict:
        return {"node_id": node, "gpu_ids": gpus, "device": device}

    assert on_distinct_gpus([actor("a", [0]), actor("a", [1])])
    assert on_distinct_gpus([actor("a", [0]), actor("b", [0])])  # GPU ids repeat on every node
    assert not on_distinct_gpus([actor("a", [0]), actor("a", [0])])  # fractions of one GPU
    assert not on_distinct_gpus([actor("a", [0]), actor("b", [], "cpu")])
    assert not on_distinct_gpus([actor("a", [0], "cpu"), actor("a", [1], "cpu")])  # GPUs Ray gave, no CUDA here
