"""Reliability and security of a served graph: the API fuzzed from its own OpenAPI schema, tenancy
(limits, sessions, keys), more sessions than the latent cache holds, bad gRPC input, and the graph's
processes killed under concurrent streams. One Serve application for the module; the faults come last
because they kill parts of it (each test waits until it has recovered)."""

from __future__ import annotations

import http.client
import json
import threading
from pathlib import Path

import grpc
import pytest
import ray

from bench import capacity
from bench.faults import Target, kill_cache_manager, kill_engine_replica, kill_router, run_fault
from bench.fuzz import fuzz, is_openai_error
from model import DeepseekV2ForCausalLM, LatentCache
from model.tokenizer import ChatTokenizer
from serving import moeray_pb2 as pb
from serving import moeray_pb2_grpc as pb_grpc
from serving.keys import OpenExposure, refuse_open_exposure

from .reference import CONFIG_B
from .served import KEY_A, KEY_B, Server, served_app

pytestmark = pytest.mark.timeout(600)

KEY_C = "sk-test-carol"  # the capacity test's tenant
GRAPH = "reliability"
BLOCK = 16
POOL_BLOCKS = 16  # the latent cache: 16 blocks of 16 tokens on the one router
MAX_CONCURRENT = 4  # per key
MAX_BODY = 16 * 1024
EOS = {CONFIG_B.eos_token_id, ChatTokenizer.bundled(CONFIG_B.vocab_size).eos_token_id}  # where the server stops


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoints, tmp_path_factory):
    engine = {
        "max_model_len": 64, "block_size": BLOCK,
        "cache_bytes_per_router": POOL_BLOCKS * BLOCK * LatentCache.bytes_per_token(CONFIG_B),
        "host_offload_bytes": 0, "object_store_offload_bytes": 0,  # idle sessions go straight to disk
        "offload_dir": str(tmp_path_factory.mktemp("offload")),
        "owner_limits": {"max_concurrent": MAX_CONCURRENT},
    }
    args = {"engine": engine, "api_keys": [KEY_A, KEY_B, KEY_C], "default_max_tokens": 16,
            "max_body_bytes": MAX_BODY, "busy_streams": 4, "coalesce_s": 0.02}
    with served_app(tiny_checkpoints["B"], GRAPH, args) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_checkpoints):
    model = DeepseekV2ForCausalLM.from_pretrained(tiny_checkpoints["B"])
    return lambda prompt, n: model.generate([prompt], n)[0]


def complete(server: Server, prompt: list[int], max_tokens: int, key: str = KEY_A, **fields) -> tuple[int, dict]:
    """One (non-streamed) completion over HTTP: status and body."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **fields}
    return server.raw("POST", "/v1/completions", body, key=key)


def generate_ids(server: Server, prompt: list[int], max_tokens: int, key: str = KEY_A,
                 session_id: str = "") -> tuple[list[int], pb.Usage]:
    return capacity.generate_ids(f"127.0.0.1:{server.grpc_port}", server.model, prompt, max_tokens, key, session_id)


def engine_stats(server: Server) -> dict:
    status, stats = server.raw("GET", "/v1/stats")
    assert status == 200, stats
    return stats


# ---- the schema and the fuzzer ------------------------------------------------------------------
def test_openapi_schema_publishes_the_request_models(server):
    status, schema = server.raw("GET", "/openapi.json", key=None)
    assert status == 200
    completions = schema["paths"]["/v1/completions"]["post"]
    assert completions["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    models = schema["components"]["schemas"]
    assert {"prompt", "model", "max_tokens", "n", "session_id"} <= set(models["CompletionRequest"]["properties"])
    assert models["ChatCompletionRequest"]["properties"]["messages"]["minItems"] == 1
    assert {"/v1/sessions", "/v1/sessions/{session_id}", "/v1/models/{model}"} <= set(schema["paths"])
    assert "X-Session-Id" in [p["name"] for p in completions["parameters"]]
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}


def test_fuzzing_from_the_schema_finds_no_5xx_and_only_openai_errors(server):
    report = fuzz(server.base_url, server.model, [KEY_A, KEY_B], requests_wanted=240, seed=13)
    summary = report.summary()
    assert report.requests >= 200, summary
    assert report.server_errors == 0 and report.non_openai_errors == 0 and report.missing_retry_after == 0, summary
    assert report.answers_after, summary
    assert sum(v for k, v in report.by_status.items() if k == 200) > 0, summary  # some got through to the engine


# ---- tenancy --------------------------------------------------------------------------------------
def test_owner_gate_limits_each_key_s_rate_and_concurrency_alone():
    from engine.generation import RateLimited
    from engine.limits import OwnerGate, OwnerLimits

    now = [0.0]
    gate = OwnerGate(OwnerLimits(requests_per_s=2, burst=3, max_concurrent=2), clock=lambda: now[0])
    gate.enter("a")
    gate.enter("a")
    with pytest.raises(RateLimited, match="2 requests running"):
        gate.enter("a")
    gate.enter("b")  # another key is not affected
    gate.leave("a")
    gate.enter("a")  # the third of a's burst
    gate.leave("a")
    with pytest.raises(RateLimited) as caught:  # the burst is spent: a token comes back in 0.5 s
        gate.enter("a")
    assert caught.value.retry_after_s == pytest.approx(0.5)
    now[0] += 0.5
    gate.enter("a")


def test_a_key_over_its_concurrency_limit_gets_429_while_another_key_is_served(server):
    body = {"model": server.model, "prompt": [7, 7, 7], "max_tokens": 40, "stream": True, "temperature": 0}
    streams = []
    try:
        for _ in range(MAX_CONCURRENT):
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            connection.request("POST", "/v1/completions", json.dumps(body),
                               {"Authorization": f"Bearer {KEY_B}", "Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            response.read1(16)  # it runs
            streams.append(connection)
        status, headers, error = server.exchange("POST", "/v1/completions", {**body, "stream": False}, key=KEY_B)
        assert status == 429 and int(headers["retry-after"]) >= 1, error
        assert is_openai_error(error) and error["error"]["code"] == "rate_limit_exceeded"
        assert complete(server, [1, 2, 3], 2, key=KEY_A)[0] == 200  # another key is not starved
    finally:
        for connection in streams:
            connection.close()


def test_sessions_are_listed_and_ended_only_by_their_key(server):
    assert complete(server, [9, 8, 7, 6, 5], 3, session_id="tenancy-a")[0] == 200
    status, listed = server.raw("GET", "/v1/sessions", key=KEY_A)
    assert status == 200 and "tenancy-a" in [s["id"] for s in listed["data"]]
    assert "tenancy-a" not in [s["id"] for s in server.raw("GET", "/v1/sessions", key=KEY_B)[1]["data"]]
    for method, path, body in [("DELETE", "/v1/sessions/tenancy-a", None),
                               ("POST", "/v1/completions", {"model": server.model, "prompt": [9, 8, 7], "max_tokens": 2,
                                                            "session_id": "tenancy-a"})]:
        status, error = server.raw(method, path, body, key=KEY_B)
        assert status == 404 and error["error"]["code"] == "session_not_found", error
    assert server.raw("DELETE", "/v1/sessions/tenancy-a", key=KEY_A) == (
        200, {"id": "tenancy-a", "object": "session", "deleted": True})
    assert server.raw("DELETE", "/v1/sessions/tenancy-a", key=KEY_A)[0] == 404


def test_keys_never_reach_the_logs(server):
    assert server.raw("GET", "/v1/models", key="sk-never-valid-7f3a")[0] == 401
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    for path in logs.rglob("*"):
        if path.is_file():
            text = path.read_bytes()
            for key in (KEY_A, KEY_B, KEY_C, "sk-never-valid-7f3a"):
                assert key.encode() not in text, f"{key} is in {path}"


def test_serving_without_a_key_beyond_loopback_is_refused(server, tiny_checkpoints):
    from serving.app import build

    for host in ("127.0.0.1", "::1", "localhost"):
        refuse_open_exposure(host)
    for host in ("0.0.0.0", "[::]", "192.168.1.4", "example.com"):
        with pytest.raises(OpenExposure):
            refuse_open_exposure(host)
    args = {"model": str(tiny_checkpoints["B"]), "name": GRAPH, "create_graph": False}
    with pytest.raises(OpenExposure, match="gRPC"):  # this Serve's gRPC proxy listens on every interface
        build(args)
    build({**args, "allow_unauthenticated": True})
    build({**args, "api_keys": ["sk-any"]})


# ---- capacity -------------------------------------------------------------------------------------
def test_four_times_the_sessions_the_cache_holds_are_offloaded_and_restored_exactly(server, reference):
    def matches_reference(history: list[int], answer: list[int]) -> bool:
        return capacity.answer_matches(answer, reference(history, capacity.ANSWER_TOKENS), EOS)

    result = capacity.run_capacity(server.base_url, f"127.0.0.1:{server.grpc_port}", server.model, KEY_C,
                                   POOL_BLOCKS, matches_reference)
    assert result["sessions"] * capacity.SESSION_BLOCKS >= 4 * POOL_BLOCKS
    resident = POOL_BLOCKS // capacity.SESSION_BLOCKS
    assert result["offloaded_to_disk_after_first_turns"] >= result["sessions"] - resident, result
    assert result["offload_files_after_first_turns"] == result["offloaded_to_disk_after_first_turns"], result
    assert result["restores"] >= result["sessions"] - resident, result
    assert result["lost"] == result["wrong_answers"] == result["not_fully_restored"] == 0, result
    assert result["orphan_files_after_end"] == result["sessions_left_after_end"] == 0, result


# ---- gRPC -----------------------------------------------------------------------------------------
def test_grpc_refuses_bad_input_with_the_right_status(server):
    metadata = [("authorization", f"Bearer {KEY_A}"), ("application", "moeray")]
    good = pb.GenerateRequest(model="tiny", prompt_ids=[1, 2, 3], max_tokens=2)
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.MoerayStub(channel)
        raw_generate = channel.unary_stream("/moeray.Moeray/Generate")  # bytes as they come
        cases = [
            (lambda: stub.Generate(good, metadata=[("application", "moeray")]), grpc.StatusCode.UNAUTHENTICATED),
            (lambda: stub.Generate(pb.GenerateRequest(model="nope", prompt_ids=[1]), metadata=metadata),
             grpc.StatusCode.NOT_FOUND),
            (lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="x" * (MAX_BODY + 1)), metadata=metadata),
             grpc.StatusCode.RESOURCE_EXHAUSTED),
            (lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt="x" * (5 * 1024**2)), metadata=metadata),
             grpc.StatusCode.RESOURCE_EXHAUSTED),
            (lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt_ids=[1], n=1000), metadata=metadata),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stub.Generate(pb.GenerateRequest(model="tiny", prompt_ids=[1], temperature=9.0), metadata=metadata),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stub.Generate(pb.GenerateRequest(model="tiny", messages=[pb.ChatMessage(role="robot", content="x")]),
                                   metadata=metadata), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: raw_generate(b"\xff\xfe not a protobuf", metadata=metadata), grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            with pytest.raises(grpc.RpcError) as caught:
                list(call())
            assert caught.value.code() == code, caught.value.details()
        assert list(stub.Generate(good, metadata=metadata, timeout=120))[-1].usage.completion_tokens == 2


# ---- faults under concurrent streams ----------------------------------------------------------------
def start_session(server: Server) -> tuple[str, list[int]]:
    """A session with one turn done; returns its id and the next turn's prompt."""
    prompt = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    answer, _ = generate_ids(server, prompt, 4, session_id="fault-session")
    return "fault-session", prompt + answer + [1, 2]


def next_turn_is_right(server: Server, session: str, history: list[int], reference) -> pb.Usage:
    answer, usage = generate_ids(server, history, 4, session_id=session)
    assert capacity.answer_matches(answer, reference(history, 4), EOS), (answer, reference(history, 4))
    server.raw("DELETE", f"/v1/sessions/{session}")
    return usage


@pytest.mark.parametrize("fault", ["cache_manager", "router"])
def test_a_killed_graph_process_loses_no_stream_and_its_sessions_recompute(server, reference, fault):
    kill = {"cache_manager": kill_cache_manager, "router": kill_router}[fault]
    target = Target(server.base_url, KEY_A, server.model, GRAPH)
    session, history = start_session(server)
    before = engine_stats(server)["recoveries"]
    outcome = run_fault(target, fault, lambda: kill(target), streams=MAX_CONCURRENT - 1)
    summary = outcome.summary()
    assert summary["lost"] == 0 and outcome.recovery_s is not None and outcome.recovered_streams, summary
    if fault == "cache_manager":  # the running sequences were adopted by the new manager: they finish
        assert outcome.outcomes["retryable"] == 0, summary
    assert engine_stats(server)["recoveries"][f"{fault}_restarts"] == before[f"{fault}_restarts"] + 1
    usage = next_turn_is_right(server, session, history, reference)
    assert usage.cached_tokens == 0  # recomputed from the conversation, never read from lost blocks


def test_a_killed_engine_replica_answers_503_with_retry_after_then_recovers(server):
    target = Target(server.base_url, KEY_A, server.model, GRAPH)
    answers: list[tuple[int, bool]] = []  # status, and whether the answer is as promised
    stop = threading.Event()

    def poll_stats() -> None:  # a unary call to the engine replica, beside the streams
        while not stop.is_set():
            status, headers, body = server.exchange("GET", "/v1/stats")
            answers.append((status, status == 200 or ("retry-after" in headers and is_openai_error(body))))

    poller = threading.Thread(target=poll_stats, daemon=True)
    poller.start()
    try:
        outcome = run_fault(target, "engine_replica", lambda: kill_engine_replica(target), streams=MAX_CONCURRENT - 1)
    finally:
        stop.set()
        poller.join(timeout=150)
    summary = outcome.summary()
    assert summary["lost"] == 0 and outcome.recovery_s is not None and outcome.recovered_streams, summary
    assert outcome.outcomes["retryable"] >= 1, summary  # the streams running at the kill, or sent while down
    statuses = [status for status, _ in answers]
    assert all(promised for _, promised in answers) and set(statuses) == {200, 503} and statuses[-1] == 200, answers
