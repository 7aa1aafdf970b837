"""The latent-KV cache manager and the continuous-batching engine on 2 expert actors."""

import asyncio

import pytest

from cluster.graph import ActorGraph
from cluster.spec import ClusterSpec
from model import DeepseekV2ForCausalLM, LatentCache
from model.sampling import SamplingParams
from engine import Engine, EngineConfig
from engine.generation import GenerationRequest, PromptTooLong, SessionNotFound, Usage

from .reference import CONFIG_B

pytestmark = pytest.mark.timeout(600)
GREEDY = SamplingParams(temperature=0)
BLOCK = 4


@pytest.fixture(scope="module")
def graph(ray_cluster, tiny_checkpoints):
    graph = ActorGraph.create(
        ClusterSpec(model=str(tiny_checkpoints["B"]), name="engine", expert_actors=2, cpus_per_actor=0.5)
    )
    yield graph
    graph.teardown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    model = DeepseekV2ForCausalLM.from_pretrained(tiny_checkpoints["B"])
    return lambda prompt, n: model.generate([prompt], n)[0]


def run(graph, body, **config):
    async def main():
        engine = await Engine.create(graph, EngineConfig(block_size=BLOCK, **config))
        try:
            return await body(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(main())


async def complete(engine, request_id, prompt, max_tokens, **fields):
    tokens, usage = {}, None
    request = GenerationRequest(request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens, **fields)
    async for event in engine.generate(request):
        if isinstance(event, Usage):
            usage = event
        else:
            tokens.setdefault(event.choice, []).append(event.token_id)
    return tokens, usage


def test_multi_turn_session_prefills_only_new_tokens(graph, reference):
    async def body(engine):
        history, report = [3, 1, 4, 1, 5], []
        for turn in range(5):
            before = (await engine.stats())["prefill_tokens"]
            tokens, usage = await complete(engine, f"turn{turn}", history, 6, sampling=GREEDY, owner="k", session_id="chat")
            computed = (await engine.stats())["prefill_tokens"] - before
            assert tokens[0] == reference(history, 6)
            report.append((len(history), usage.cached_tokens, computed))
            history = history + tokens[0] + [turn + 7, 2, 9]  # the next user message
        return report, (await engine.stats())["cache"]

    report, cache = run(graph, body)
    previous = 0
    for prompt_len, cached, computed in report:
        assert cached == previous  # everything the session already held
        assert computed == prompt_len - previous  # only the new tokens were prefilled
        previous = prompt_len + 5  # the last answer token was sampled, never fed back
    assert cache["hit_rate"] == pytest.approx(sum(r[1] for r in report) / sum(r[0] for r in report))


def test_prefix_sharing_and_n_greater_than_one(graph, reference):
    shared = list(range(30, 50))

    async def body(engine):
        first, _ = await complete(engine, "a", shared + [1, 2], 5, sampling=GREEDY)
        second, usage = await complete(engine, "b", shared + [7], 5, sampling=GREEDY)
        forked, fork_usage = await complete(engine, "c", shared, 4, n=3, sampling=SamplingParams(temperature=1.0, seed=5))
        return first, second, usage, forked, fork_usage

    first, second, usage, forked, fork_usage = run(graph, body)
    assert first[0] == reference(shared + [1, 2], 5)
    assert second[0] == reference(shared + [7], 5)
    assert usage.cached_tokens == 20  # five full blocks of the shared prefix
    assert sorted(forked) == [0, 1, 2] and fork_usage.completion_tokens == 12
    assert len({tuple(t) for t in forked.values()}) > 1  # the choices sample differently


def test_64_concurrent_mixed_requests_and_seeded_sampling_is_batch_independent(graph, reference):
    seeded = dict(sampling=SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234))
    seeded_prompt = [9, 8, 7, 6, 5]

    async def body(engine):
        alone, _ = await complete(engine, "alone", seeded_prompt, 10, **seeded)
        jobs = []
        for i in range(64):
            prompt = [(i * 7 + j) % CONFIG_B.vocab_size for j in range(1 + (i * 13) % 40)]
            if i % 4 == 0:
                jobs.append(complete(engine, f"g{i}", prompt, 1 + i % 9, sampling=GREEDY))
            elif i % 4 == 1:
                jobs.append(complete(engine, f"s{i}", prompt, 6, sampling=SamplingParams(
                    temperature=0.7, top_k=20, presence_penalty=0.5, frequency_penalty=0.3, top_logprobs=3)))
            elif i % 4 == 2:
                jobs.append(complete(engine, f"n{i}", prompt, 4, n=2, sampling=SamplingParams(temperature=1.0, seed=i)))
            else:
                jobs.append(complete(engine, f"seeded{i}", seeded_prompt, 10, **seeded))
        return alone, await asyncio.gather(*jobs)

    alone, results = run(graph, body, max_batch_tokens=64)
    for i, (tokens, usage) in enumerate(results):
        assert usage is not None
        if i % 4 == 0:
            prompt = [(i * 7 + j) % CONFIG_B.vocab_size for j in range(1 + (i * 13) % 40)]
            assert tokens[0] == reference(prompt, 1 + i % 9)
        elif i % 4 == 2:
            assert sorted(tokens) == [0, 1] and all(len(t) == 4 for t in tokens.values())
        elif i % 4 == 3:
            assert tokens[0] == alone[0]


def test_forty_sessions_on_a_ten_session_budget_offload_and_restore(graph, reference, tmp_path):
    per_session_tokens = 24 + 4 + 3 + 4
    budget = 10 * -(-per_session_tokens // BLOCK) * BLOCK * LatentCache.bytes_per_token(CONFIG_B)
    block_bytes = BLOCK * LatentCache.bytes_per_token(CONFIG_B)

    async def body(engine):
        # A first token of its own per session: sessions that shared prefix blocks would let more than
        # `resident` of them stay in the pool, and how many did would depend on the order they ran in.
        prompts = {s: [s + 1] + [(s * 5 + j) % 120 + 1 for j in range(23)] for s in range(40)}

        async def conversation(s):
            first, _ = await complete(engine, f"{s}-1", prompts[s], 4, sampling=GREEDY, owner="k", session_id=f"s{s}")
            history = prompts[s] + first[0] + [1, 2, 3]
            return history, first[0]

        turns = await asyncio.gather(*(conversation(s) for s in range(40)))
        stats_mid = (await engine.stats())["cache"]
        second = await asyncio.gather(*(
            complete(engine, f"{s}-2", history, 4, sampling=GREEDY, owner="k", session_id=f"s{s}")
            for s, (history, _) in enumerate(turns)
        ))
        return turns, second, stats_mid, (await engine.stats())["cache"]

    turns, second, mid, end = run(
        graph, body, cache_bytes_per_router=budget, host_offload_bytes=4 * 9 * block_bytes,
        object_store_offload_bytes=4 * 9 * block_bytes, offload_dir=str(tmp_path),
    )
    resident = (budget // block_bytes) // -(-(24 + 4 - 1) // BLOCK)  # idle sessions the pool can hold
    assert resident <= 13
    assert mid["offloads"] >= 40 - resident and sum(mid["offloaded_sessions"].values()) >= 40 - resident
    assert all(count > 0 for count in mid["offloaded_sessions"].values())  # host, object store and disk
    assert end["restores"] >= 40 - resident
    for s, ((history, first), (tokens, usage)) in enumerate(zip(turns, second)):
        assert tokens[0] == reference(history, 4), s
        assert usage.cached_tokens == len(history) - 4  # the restored session (all but the last answer token)


def test_sessions_belong_to_their_owner_and_bad_requests_fail_clearly(graph):
    async def body(engine):
        await complete(engine, "mine", [1, 2, 3], 2, sampling=GREEDY, owner="alice", session_id="private")
        with pytest.raises(SessionNotFound):
            await complete(engine, "theirs", [1, 2, 3], 2, sampling=GREEDY, owner="mallory", session_id="private")
        with pytest.raises(PromptTooLong):
            await complete(engine, "long", [1] * CONFIG_B.max_position_embeddings, 2)
        # Cancelling mid-stream frees the blocks at once.
        request = GenerationRequest(request_id="cut", prompt_ids=[5] * 30, max_tokens=50, sampling=GREEDY)
        stream = engine.generate(request)
        await stream.__anext__()
        await stream.aclose()
        return (await engine.stats())["cache"]

    cache = run(graph, body)
    assert cache["running_sequences"] == 0


def test_two_routers_keep_session_affinity_and_move_a_session_whose_router_is_full(
    ray_cluster, tiny_checkpoints, reference
):
    graph = ActorGraph.create(
        ClusterSpec(model=str(tiny_checkpoints["B"]), name="engine-2r", routers=2, expert_actors=2, cpus_per_actor=0.4)
    )
    pool_blocks = 24

    async def body(engine):
        histories = {s: [s + 1, 9, 2, 6, 5, 3, 5] for s in range(4)}
        for turn in range(3):
            for s, history in histories.items():
                tokens, usage = await complete(engine, f"{s}-{turn}", history, 3, sampling=GREEDY, owner="k", session_id=f"s{s}")
                assert tokens[0] == reference(history, 3)
                # Every turn lands where the session's blocks are (no two sessions share a prefix block).
                assert usage.cached_tokens == (len(history) - 3 if turn else 0)
                histories[s] = history + tokens[0] + [4, 4]
        cache = (await engine.stats())["cache"]
        assert [r["sessions"] for r in cache["routers"]] == [2, 2]  # sessions spread over both routers
        assert cache["session_moves"] == 0
        # s2 (router 0, its most recent session) continues while a long request that shares its prefix
        # holds every other block of router 0 (s0 is offloaded to make room for it): s2 moves to router 1.
        long_prompt = histories[2] + [7]
        long_max_tokens = BLOCK * (pool_blocks - 1) - len(long_prompt)  # every block of router 0 but s2's last
        long = complete(engine, "long", long_prompt, long_max_tokens, sampling=GREEDY)
        moved = complete(engine, "moved", histories[2], 3, sampling=GREEDY, owner="k", session_id="s2")
        (long_tokens, _), (tokens, usage) = await asyncio.gather(long, moved)
        assert len(long_tokens[0]) == long_max_tokens
        return tokens[0], usage, histories[2], (await engine.stats())["cache"]

    try:
        tokens, usage, history, cache = run(graph, body, cache_bytes_per_router=pool_blocks * BLOCK * LatentCache.bytes_per_token(CONFIG_B))
    finally:
        graph.teardown()
    assert cache["session_moves"] == 1 and [r["sessions"] for r in cache["routers"]] == [1, 3]
    assert tokens == reference(history, 3)
    assert usage.cached_tokens == len(history) - 3  # the shipped blocks were used, not recomputed
