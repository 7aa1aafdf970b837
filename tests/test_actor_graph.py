"""The expert-parallel actor graph on a real local Ray cluster: same tokens, same gradients."""

import glob
import json
import os
import subprocess
import sys
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import ray
import torch

from actors.load_stats import LoadStats
from actors.placement import Placement
from actors.transports.base import TransportSettings
from actors.transports.objectstore import ObjectStoreTransport
from actors.transports.remote_experts import RemoteExperts
from actors.transports.unix_socket import SocketTransport
from cluster.graph import ActorGraph
from cluster.spec import ClusterSpec
from model import DeepseekV2ForCausalLM

from .reference import CONFIG_B

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[5, 9, 3, 17], [7, 1, 4, 4, 8, 2, 6, 30, 31], [11]]
NEW_TOKENS = 8


def reference_tokens(folder) -> list[list[int]]:
    return DeepseekV2ForCausalLM.from_pretrained(folder).generate(PROMPTS, NEW_TOKENS)


def make_graph(folder, name: str, expert_actors: int, **spec) -> ActorGraph:
    return ActorGraph.create(
        ClusterSpec(model=str(folder), name=name, expert_actors=expert_actors, cpus_per_actor=0.5, **spec)
    )


def generate(graph: ActorGraph, prompts=PROMPTS) -> list[list[int]]:
    return ray.get(graph.routers[0].generate.remote(prompts, NEW_TOKENS))


def held_cores(graph: ActorGraph) -> list[list[int] | None]:
    """Each process's claimed cores (router first), checked against where the OS lets its threads run."""
    described = [ray.get(actor.ready.remote()) for actor in [*graph.routers, *graph.experts]]
    for process in described:
        allowed = set()
        for tid in os.listdir(f"/proc/{process['pid']}/task"):
            try:
                allowed |= os.sched_getaffinity(int(tid))
            except ProcessLookupError:  # a thread that has just ended
                pass
        assert allowed == set(process["cores"] or os.sched_getaffinity(0)), process
    return [process["cores"] for process in described]


def assert_pinned_apart(cores: list[list[int] | None], threads: list[int]) -> None:
    """Every process on as many cores as it has threads, and the graph on as many distinct cores as the
    machine lets it (the other graphs a test module keeps running claim cores evenly too)."""
    assert [len(c or []) for c in cores] == threads
    assert len({core for process in cores for core in process}) == min(len(os.sched_getaffinity(0)), sum(threads))


@pytest.mark.parametrize(
    "config_name, expert_actors, router_threads, pin_cores",
    [("A", 2, None, True), ("B", 1, None, False), ("B", 2, 2, True), ("B", 4, None, True)],
)
def test_same_greedy_tokens_for_every_actor_count_and_transport(
    ray_cluster, tiny_checkpoints, config_name, expert_actors, router_threads, pin_cores
):
    folder = tiny_checkpoints[config_name]
    expected = reference_tokens(folder)
    graph = make_graph(folder, f"same-{config_name}-{expert_actors}", expert_actors, router_cpu_threads=router_threads,
                       pin_cores=pin_cores)  # fmt: skip
    try:
        router = graph.routers[0]
        threads = [ray.get(actor.ready.remote())["torch_threads"] for actor in [router, *graph.experts]]
        assert threads == [router_threads or 1] + [1] * expert_actors
        cores = held_cores(graph)
        if pin_cores:
            assert_pinned_apart(cores, threads)
        else:
            assert cores == [None] * len(threads)
        assert generate(graph) == expected
        assert ray.get(router.set_transport.remote("compiled")) == "compiled"
        assert generate(graph) == expected
        assert held_cores(graph) == cores
        stats = ray.get(router.load_stats.remote())
        assert stats["transport"] == "compiled"
        ray.get(router.set_transport.remote("objectstore"))
    finally:
        graph.teardown()
    for layer in stats["layers"].values():
        assert sum(layer["tokens_per_expert"]) > 0
        if config_name == "B":  # device-limited routing: groups are aligned with actors
            assert layer["actors_per_token_max"] <= CONFIG_B.topk_group
        assert layer["actors_per_token_max"] <= expert_actors


def test_cli_generate_through_expert_actors(ray_cluster, tiny_checkpoints):
    folder = str(tiny_checkpoints["B"])
    env = {**os.environ, "RAY_ADDRESS": ray_cluster, "RAY_AUTH_MODE": "disabled"}

    def cli(*args: str) -> dict:
        command = [sys.executable, "-m", "cli", "generate", "--model", folder, "--prompt-ids", "5,9,3,17"]
        done = subprocess.run([*command, "--max-tokens", str(NEW_TOKENS), "--json", *args],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    one_process = cli("--expert-actors", "0")
    assert one_process["token_ids"] == reference_tokens(folder)[0]
    graph = cli("--expert-actors", "2", "--transport", "compiled")
    assert graph["token_ids"] == one_process["token_ids"]
    assert graph["transport"] == "compiled"


@pytest.fixture(scope="module")
def graph_b2(ray_cluster, tiny_checkpoints):
    graph = make_graph(tiny_checkpoints["B"], "grad-b2", 2)
    yield graph
    graph.teardown()


def assert_gradients_equal_one_process(graph: ActorGraph, folder, shape: tuple[int, int]) -> None:
    ids = torch.randint(0, CONFIG_B.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(*shape, CONFIG_B.vocab_size, generator=torch.Generator().manual_seed(1))

    local = DeepseekV2ForCausalLM.from_pretrained(folder).train()
    (local(ids).logits * weights).sum().backward()
    expected = {name: p.grad for name, p in local.named_parameters()}

    got = ray.get(graph.routers[0].forward_backward.remote(ids, weights))
    for actor in graph.experts:
        got.update(ray.get(actor.grads.remote()))
        ray.get(actor.zero_grad.remote())
    assert got.keys() == {name for name, grad in expected.items() if grad is not None}
    for name, grad in got.items():
        scale = max(expected[name].abs().max().item(), 1.0)
        torch.testing.assert_close(grad, expected[name], atol=1e-5 * scale, rtol=0, msg=name)


def messages_sent(graph: ActorGraph, step) -> dict[str, int]:
    """How the expert messages of `step()` went: counts per route (objectstore.MESSAGE_ROUTES)."""
    before = ray.get(graph.routers[0].describe.remote())["messages"]
    step()
    after = ray.get(graph.routers[0].describe.remote())["messages"]
    return {route: after[route] - before[route] for route in after}


# 2 x 12 tokens: a few KB per actor, inline; 8 x 64: ~64 KB and more, through shared memory
@pytest.mark.parametrize("shape, tensors", [((2, 12), "inline"), ((8, 64), "shared_memory")])
@pytest.mark.parametrize("transport", ["socket", "objectstore"])
def test_gradients_through_the_actor_graph_equal_one_process(graph_b2, tiny_checkpoints, transport, shape, tensors):
    router = graph_b2.routers[0]
    ray.get(router.set_transport.remote(transport))
    route = f"socket_{tensors}" if transport == "socket" else tensors
    before = ray.get([actor.ready.remote() for actor in graph_b2.experts])
    try:
        sent = messages_sent(graph_b2, lambda: assert_gradients_equal_one_process(graph_b2, tiny_checkpoints["B"], shape))
    finally:
        ray.get(router.set_transport.remote("socket"))
    after = ray.get([actor.ready.remote() for actor in graph_b2.experts])
    assert sent[route] > 0 and sum(sent.values()) == sent[route], sent
    # each actor times every message it answers (the part of a round trip that is not Ray's transport)
    answered = [a["messages"] - b["messages"] for a, b in zip(after, before)]
    assert sum(answered) == sent[route] and min(answered) > 0, answered
    assert all(a["busy_s"] > b["busy_s"] for a, b in zip(after, before))
    assert not glob.glob("/dev/shm/moeray-*")  # a file is unlinked once its actor has answered through it


def test_a_router_on_two_threads_lends_one_while_its_expert_actors_work(graph_b2):
    """Driven from this process, as a router's step thread drives it: 1 torch thread from each send
    (forward and backward) until the replies are in, both threads for the router's own work."""
    n_experts, layers = CONFIG_B.n_routed_experts, CONFIG_B.moe_layers
    experts = RemoteExperts(
        ObjectStoreTransport(graph_b2.experts, TransportSettings(), torch.device("cpu")),
        Placement.contiguous(n_experts, len(graph_b2.experts), layers, CONFIG_B.n_group),
        LoadStats(layers, n_experts, len(graph_b2.experts)),
        threads=2,
    )
    tokens, counts = torch.randn(n_experts, CONFIG_B.hidden_size), [1] * n_experts
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pending = experts.submit(layers[0], tokens, counts, torch.arange(n_experts), keep_for_backward=True)
        assert torch.get_num_threads() == 1
        outputs = pending.result()
        assert torch.get_num_threads() == 2
        pending.start_backward(torch.ones_like(outputs))
        assert torch.get_num_threads() == 1
        assert pending.grad_tokens().shape == tokens.shape
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
        ray.get([actor.zero_grad.remote() for actor in graph_b2.experts])


def test_the_socket_transport_answers_as_the_object_store_and_keeps_its_replies_in_order(graph_b2):
    """Driven from this process, as a router's step thread drives it: the same answers as ordinary
    actor calls (tensors inline and through shared memory), an actor's error raised here with the next
    message answered, a reply a failed step left unread dropped rather than taken for the next, and a
    client without the actor's key refused."""
    layer, hidden = CONFIG_B.moe_layers[0], CONFIG_B.hidden_size
    per_actor = CONFIG_B.n_routed_experts // 2  # the contiguous placement: actor 0 holds the first half
    objectstore = ObjectStoreTransport(graph_b2.experts, TransportSettings(), torch.device("cpu"))
    sockets = SocketTransport(graph_b2.experts, TransportSettings(), torch.device("cpu"), fallback=objectstore)

    def messages(rows: int, seed: int) -> dict:
        generator = torch.Generator().manual_seed(seed)
        counts = [[rows // per_actor] * per_actor + [0] * per_actor, [0] * per_actor + [rows // per_actor] * per_actor]
        return {a: (torch.randn(rows, hidden, generator=generator), counts[a]) for a in (0, 1)}

    def assert_same_answers(message: dict) -> None:
        got, expected = sockets.send(layer, message, False).receive(), objectstore.send(layer, message, False).receive()
        for actor in message:
            torch.testing.assert_close(got[actor].outputs, expected[actor].outputs, rtol=0, atol=0)

    try:
        for rows, route in ((4, "socket_inline"), (256, "socket_shared_memory")):
            before = objectstore.sent[route]
            assert_same_answers(messages(rows, seed=rows))
            assert objectstore.sent[route] == before + 2
        with pytest.raises(KeyError):
            sockets.send_backward({0: 10**6}, {0: torch.ones(4, hidden)}).receive()  # no such forward
        assert_same_answers(messages(4, seed=1))
        sockets.send(layer, messages(256, seed=2), False)  # a failed step's: its replies are never read
        assert_same_answers(messages(256, seed=3))
        address = ray.get(graph_b2.experts[0].open_socket.remote())
        with pytest.raises(AuthenticationError):
            Client(address.address, family="AF_UNIX", authkey=b"not the actor's key")
        assert_same_answers(messages(4, seed=4))  # the actor still listens and answers
        assert (sockets.failures, sockets.healthy) == (0, True)
    finally:
        sockets.teardown()


def test_a_restarted_expert_actor_gets_its_messages_inline_once_then_through_a_new_file(ray_cluster, tiny_checkpoints):
    folder = tiny_checkpoints["B"]
    graph = make_graph(folder, "shm-restart", 2, transport="objectstore")
    try:
        assert messages_sent(graph, lambda: assert_gradients_equal_one_process(graph, folder, (8, 64)))["inline"] == 0
        ray.kill(graph.experts[1], no_restart=False)
        deadline = time.monotonic() + 120
        while True:  # Ray restarts it; its new process cannot map the router's (unlinked) file
            try:
                ray.get(graph.experts[1].ready.remote(), timeout=10)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                assert time.monotonic() < deadline, "the expert actor was never restarted"
        sent = messages_sent(graph, lambda: assert_gradients_equal_one_process(graph, folder, (8, 64)))
        assert sent["inline"] == 1, sent  # the refused message, sent again inline
        sent = messages_sent(graph, lambda: assert_gradients_equal_one_process(graph, folder, (8, 64)))
        assert sent["inline"] == 0 and sent["shared_memory"] > 0, sent
    finally:
        graph.teardown()
    assert not glob.glob("/dev/shm/moeray-*")


def test_rebalancing_with_replicas_keeps_tokens_and_lowers_imbalance(graph_b2, tiny_checkpoints):
    router = graph_b2.routers[0]
    local = DeepseekV2ForCausalLM.from_pretrained(tiny_checkpoints["B"])

    def actor_imbalance(token: int) -> float:
        with torch.no_grad():
            counts = local(torch.tensor([[token] * 24])).tokens_per_expert[1]
        load = graph_b2.placement.actor_load(1, counts)
        return float(load.max() / load.mean())

    # A skewed synthetic load: the one token whose repetition loads one actor the most.
    hot = max(range(CONFIG_B.vocab_size), key=actor_imbalance)
    skewed = [[hot] * 24, [hot] * 20 + [4] * 4]
    expected = local.generate(skewed, NEW_TOKENS)
    ray.get(router.reset_stats.remote())
    assert generate(graph_b2, skewed) == expected
    before = ray.get(router.load_stats.remote())["layers"]["1"]

    placement = ray.get(router.rebalance.remote(extra_copies=2))
    assert any(len(actors) > 1 for actors in placement["copies"][1])
    held = [ray.get(actor.held.remote())[1] for actor in graph_b2.experts]
    assert held == [[e for e, actors in enumerate(placement["copies"][1]) if a in actors] for a in range(2)]

    assert generate(graph_b2, skewed) == expected
    after = ray.get(router.load_stats.remote())["layers"]["1"]
    assert after["tokens_per_expert"] == before["tokens_per_expert"]  # same work, spread differently
    assert after["imbalance"] < before["imbalance"]


@pytest.mark.parametrize("transport", ["compiled", "socket"])
def test_a_transport_falls_back_when_an_expert_dies_and_takes_it_up_again(ray_cluster, tiny_checkpoints, transport):
    """The compiled graph dies with the actor and is compiled again; the actor's socket breaks and the
    restarted actor's new one is opened."""
    folder = tiny_checkpoints["B"]
    expected = reference_tokens(folder)
    graph = make_graph(folder, f"failover-{transport}", 2, transport=transport)
    router = graph.routers[0]
    try:
        assert generate(graph) == expected
        ray.kill(graph.experts[1], no_restart=False)  # Ray restarts it
        assert generate(graph) == expected  # served through the object store meanwhile
        description = ray.get(router.describe.remote())
        assert description["transport_failures"] >= 1
        deadline = time.monotonic() + 120
        while not description["transport_healthy"]:
            assert time.monotonic() < deadline, f"the {transport} transport never reached the restarted actor again"
            assert generate(graph) == expected
            description = ray.get(router.describe.remote())

        def same_tokens() -> None:
            assert generate(graph) == expected

        sent = messages_sent(graph, same_tokens)
        if transport == "socket":  # nothing goes through the object store any more
            assert sent["inline"] == sent["shared_memory"] == 0 and sent["socket_inline"] > 0, sent
        assert ray.get(router.load_stats.remote())["transport"] == transport
        assert_pinned_apart(held_cores(graph), [1, 1, 1])  # the restarted actor's new process too
    finally:
        ray.get(router.set_transport.remote("objectstore"))
        graph.teardown()


def test_an_idle_compiled_graph_is_released_and_compiled_again(ray_cluster, tiny_checkpoints):
    """Its expert actors' channel readers spin while the graph stands: once idle, it lets them go."""
    folder = tiny_checkpoints["B"]
    expected = reference_tokens(folder)
    graph = make_graph(folder, "idle-release", 2, transport="compiled", compiled_idle_release_s=2.0)
    router = graph.routers[0]

    def expert_cpu_seconds_over(wall_s: float) -> list[float]:
        before = [ray.get(a.ready.remote())["cpu_s"] for a in graph.experts]
        time.sleep(wall_s)  # the measurement's window, not a wait for a condition
        return [ray.get(a.ready.remote())["cpu_s"] - b for a, b in zip(graph.experts, before)]

    try:
        assert generate(graph) == expected
        assert not ray.get(router.describe.remote())["transport_released"]
        deadline = time.monotonic() + 60
        while not ray.get(router.describe.remote())["transport_released"]:
            assert time.monotonic() < deadline, "the idle compiled graph was never released"
            time.sleep(0.2)
        assert max(expert_cpu_seconds_over(1.0)) < 0.3  # a spinning reader takes most of a core
        assert generate(graph) == expected
        description = ray.get(router.describe.remote())
        assert (description["transport"], description["transport_released"]) == ("compiled", False)
        assert description["transport_failures"] == 0
    finally:
        graph.teardown()
