"""The Serve application on a real local cluster: the official `openai` client over HTTP, a real gRPC
client through Serve's gRPC proxy, and bad requests that must get OpenAI-shaped 4xx answers."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest
import ray
import yaml

from serving import moeray_pb2 as pb
from serving import moeray_pb2_grpc as pb_grpc
from serving.app import AppArgs
from serving.grpc_api import SERVICER_FUNCTION

from .served import KEY_A, KEY_B, Server, served_app

pytestmark = pytest.mark.timeout(600)

MAX_MODEL_LEN = 128
MAX_BODY = 16 * 1024
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_checkpoints):
    """One Serve application for the module, attached to a graph this test created (2 expert actors).
    The checkpoint has no tokenizer.json: the built-in tokenizer of the tiny models serves text."""
    with served_app(tiny_checkpoints["B"], "serving-test", {
        "engine": {"max_model_len": MAX_MODEL_LEN}, "max_body_bytes": MAX_BODY, "default_max_tokens": 16,
        "busy_streams": 0, "coalesce_s": 0.1, "stats_interval_s": 1.0,
    }) as server:
        yield server


def chat(server: Server, content: str = "What is 2 plus 3?", key: str = KEY_A, **kwargs):
    params = dict(model=server.model, messages=[{"role": "user", "content": content}], max_tokens=8, temperature=0)
    return server.client(key).chat.completions.create(**{**params, **kwargs})


# ---- the happy paths ----------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")
    assert server.raw("GET", "/health", key=None) == (200, {"status": "ok", "model": "tiny"})


def test_chat_and_completions_streaming_and_not(server):
    client = server.client()
    full = chat(server, max_tokens=10)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 10 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens_details.cached_tokens >= 0

    chunks = list(chat(server, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == choice.message.content  # greedy: the same text either way
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason

    text = client.completions.create(model="tiny", prompt="Compute 4 minus 1", max_tokens=6, temperature=0)
    ids = client.completions.create(model="tiny", prompt=[9, 10, 11, 12], max_tokens=6, temperature=0)
    assert text.object == "text_completion" and ids.usage.prompt_tokens == 4
    pieces = list(client.completions.create(model="tiny", prompt="Compute 4 minus 1", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == text.choices[0].text


def test_raw_sse_ends_with_done(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line for line in response.read().decode().split("\n\n") if line]
    connection.close()
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_a_client_that_goes_away_frees_its_sequences(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 100, "stream": True, "temperature": 0}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.read1(64)  # the stream has started
    connection.close()
    deadline = time.monotonic() + 60
    while True:
        stats = server.raw("GET", "/v1/stats")[1]
        if stats["running"] == 0 and stats["queue_depth"] == 0 and stats["open_streams"] == 0:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.5)


def test_n_seed_and_stop(server):
    client = server.client()
    kwargs = dict(model="tiny", prompt="What is 7 times 6?", max_tokens=10, temperature=1.0, n=2)
    first = client.completions.create(seed=1234, **kwargs)
    again = client.completions.create(seed=1234, **kwargs)
    assert sorted(c.index for c in first.choices) == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    other = client.completions.create(seed=99, **kwargs)
    assert [c.text for c in other.choices] != [c.text for c in first.choices]
    assert 0 < first.usage.completion_tokens <= 2 * 10

    greedy = client.completions.create(model="tiny", prompt="Compute 8 plus 1", max_tokens=12, temperature=0)
    text = greedy.choices[0].text
    assert len(text) >= 4, text
    stop = text[2:4]
    stopped = client.completions.create(model="tiny", prompt="Compute 8 plus 1", max_tokens=12, temperature=0,
                                        stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_completions_take_a_list_of_prompts_each_with_its_own_n_choices(server):
    client = server.client()
    sampling = dict(model="tiny", n=2, max_tokens=6, temperature=1.0, seed=7)
    for prompts in (["Compute 4 minus 1", "What is 2 plus 2?", "Hi"], [[9, 10, 11, 12], [13, 14, 15]]):
        alone = [client.completions.create(prompt=prompt, **sampling) for prompt in prompts]
        together = client.completions.create(prompt=prompts, **sampling)
        # OpenAI's numbering: prompt by prompt, then choice by choice (seeded: the same as one at a time)
        assert [c.index for c in together.choices] == list(range(2 * len(prompts)))
        by_index = [c for result in alone for c in sorted(result.choices, key=lambda c: c.index)]
        assert [(c.text, c.finish_reason) for c in together.choices] == [(c.text, c.finish_reason) for c in by_index]
        for field in ("prompt_tokens", "completion_tokens"):
            assert getattr(together.usage, field) == sum(getattr(r.usage, field) for r in alone)

        chunks = list(client.completions.create(prompt=prompts, stream=True, stream_options={"include_usage": True},
                                                **sampling))
        streamed: dict[int, str] = {}
        for chunk in chunks[:-1]:
            for choice in chunk.choices:
                streamed[choice.index] = streamed.get(choice.index, "") + choice.text
        assert streamed == {c.index: c.text for c in together.choices}
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == together.usage.completion_tokens

    with pytest.raises(openai.BadRequestError) as caught:  # a session continues one conversation
        client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, extra_body={"session_id": "two"})
    assert caught.value.body["param"] == "prompt"


def test_logprobs(server):
    client = server.client()
    result = client.completions.create(model="tiny", prompt=[3, 4, 5], max_tokens=5, temperature=0, logprobs=2)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == result.usage.completion_tokens
    for chosen, top in zip(logprobs.token_logprobs, logprobs.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 2
        assert chosen >= max(top.values()) - 1e-4  # greedy picks the most likely token

    answer = chat(server, max_tokens=4, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in content)
    assert all(entry.bytes == list(entry.token.encode()) for entry in content)


def test_streams_coalesce_tokens_under_load(server):
    # The test server counts every stream as "load" (busy_streams=0): chunks carry several tokens.
    chunks = list(chat(server, "Compute 9 times 9", max_tokens=16, stream=True, logprobs=True))
    sizes = [len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs]
    assert sum(sizes) > 0 and max(sizes) > 1, sizes


def test_stats_and_prometheus_metrics(server):
    status, stats = server.raw("GET", "/v1/stats")
    assert status == 200
    assert stats["cache"]["bytes_per_token"] > 0 and stats["cache"]["routers"][0]["blocks_total"] > 0
    assert stats["experts"]["layers"] and stats["queue_depth"] >= 0
    assert server.raw("GET", "/v1/stats", key=None)[0] == 401

    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {"ray_moeray_requests", "ray_moeray_completion_tokens", "ray_moeray_time_to_first_token_seconds",
              "ray_moeray_cache_blocks_used", "ray_moeray_expert_imbalance", "ray_moeray_queue_depth"}
    deadline = time.monotonic() + 60
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        missing = {name for name in wanted if name not in text}
        if not missing:
            break
        assert time.monotonic() < deadline, f"metrics never exported: {missing}"
        chat(server, max_tokens=2)
        time.sleep(2)


def test_session_reuses_the_latent_cache_and_belongs_to_its_key(server):
    question = "What is 12 plus 30? Compute it step by step, then answer."  # > 2 blocks of 16 tokens
    messages = [{"role": "user", "content": question}]
    first = chat(server, question, max_tokens=6, extra_body={"session_id": "alice-1"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And 7 times 6?"}]
    client = server.client(KEY_A)
    second = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            extra_headers={"X-Session-Id": "alice-1"})
    assert second.usage.prompt_tokens_details.cached_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens

    with pytest.raises(openai.NotFoundError) as caught:
        server.client(KEY_B).chat.completions.create(model="tiny", messages=messages, max_tokens=4,
                                                     extra_body={"session_id": "alice-1"})
    assert caught.value.status_code == 404
    assert set(caught.value.body) >= {"message", "type", "code"}


def test_grpc_streams_a_generation(server):
    metadata = [("authorization", f"Bearer {KEY_A}"), ("application", "moeray")]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.MoerayStub(channel)
        models = stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=60)
        assert [m.id for m in models.models] == ["tiny"] and models.models[0].max_model_len == MAX_MODEL_LEN

        request = pb.GenerateRequest(model="tiny", prompt="What is 2 plus 3?", max_tokens=6, temperature=0,
                                     top_logprobs=1)
        responses = list(stub.Generate(request, metadata=metadata, timeout=120))
        tokens = [t for r in responses for t in r.tokens]
        assert len(tokens) == responses[-1].usage.completion_tokens <= 6
        assert responses[-1].HasField("usage") and not any(r.HasField("usage") for r in responses[:-1])
        assert tokens[-1].finish_reason in ("stop", "length")
        assert all(t.HasField("logprob") and len(t.top_logprobs) == 1 for t in tokens)
        http_text = server.client().completions.create(model="tiny", prompt="What is 2 plus 3?", max_tokens=6,
                                                       temperature=0).choices[0].text
        assert "".join(t.text for t in tokens) == http_text

        chat_request = pb.GenerateRequest(model="tiny", messages=[pb.ChatMessage(role="user", content="hi")],
                                          max_tokens=3)
        assert sum(len(r.tokens) for r in stub.Generate(chat_request, metadata=metadata, timeout=120)) <= 3

        for bad, code in [
            ((request, [("authorization", "Bearer wrong"), ("application", "moeray")]), grpc.StatusCode.UNAUTHENTICATED),
            ((pb.GenerateRequest(model="nope", prompt_ids=[1, 2]), metadata), grpc.StatusCode.NOT_FOUND),
            ((pb.GenerateRequest(model="tiny"), metadata), grpc.StatusCode.INVALID_ARGUMENT),
            ((pb.GenerateRequest(model="tiny", prompt_ids=[1], max_tokens=10**6), metadata),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(bad[0], metadata=bad[1], timeout=60))
            assert caught.value.code() == code, caught.value.details()


# ---- bad input ----------------------------------------------------------------------------------
def _is_openai_error(body: dict) -> bool:
    error = body.get("error")
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and error["message"]


def test_bad_requests_get_openai_errors_while_a_good_one_streams(server):
    good_chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    long_prompt = "1 plus 1 " * 40  # far beyond MAX_MODEL_LEN tokens with the character tokenizer
    ctx = "context_length_exceeded"
    cases = [
        # (method, path, body, key, status, param, code)
        ("GET", "/v1/models", None, None, 401, None, "invalid_api_key"),
        ("POST", "/v1/chat/completions", good_chat, None, 401, None, "invalid_api_key"),
        ("POST", "/v1/chat/completions", good_chat, "sk-wrong", 401, None, "invalid_api_key"),
        ("GET", "/v1/nothing-here", None, None, 401, None, None),
        ("GET", "/v1/nothing-here", None, KEY_A, 404, None, None),
        ("POST", "/v1/chat/completions", {**good_chat, "model": "gpt-4"}, KEY_A, 404, "model", "model_not_found"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": -3}, KEY_A, 400, "max_tokens", None),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 2], "max_tokens": 10**9}, KEY_A, 400, "max_tokens",
         None),
        ("POST", "/v1/chat/completions", {**good_chat, "max_tokens": "four"}, KEY_A, 400, "max_tokens", None),
        ("POST", "/v1/chat/completions", {**good_chat, "temperature": "hot"}, KEY_A, 400, "temperature", None),
        ("POST", "/v1/chat/completions", {**good_chat, "temperature": 7}, KEY_A, 400, "temperature", None),
        ("POST", "/v1/chat/completions", {**good_chat, "n": True}, KEY_A, 400, "n", None),
        ("POST", "/v1/chat/completions", {**good_chat, "messages": []}, KEY_A, 400, "messages", None),
        ("POST", "/v1/chat/completions", {**good_chat, "messages": "hi"}, KEY_A, 400, "messages", None),
        ("POST", "/v1/chat/completions", '{"model": "tiny", "messages": [', KEY_A, 400, None, "invalid_json"),
        ("POST", "/v1/chat/completions", "", KEY_A, 400, None, "invalid_json"),
        ("POST", "/v1/chat/completions", "[1, 2]", KEY_A, 400, None, "invalid_json"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": "x" * (MAX_BODY + 10)}, KEY_A, 413, None,
         "request_too_large"),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1, 500]}, KEY_A, 400, "prompt", None),
        ("POST", "/v1/chat/completions", {**good_chat, "messages": [{"role": "user", "content": long_prompt}]},
         KEY_A, 400, "messages", ctx),
        ("POST", "/v1/completions", {"model": "tiny", "prompt": [1] * 100, "max_tokens": 100}, KEY_A, 400,
         "max_tokens", ctx),
        ("POST", "/v1/chat/completions", {**good_chat, "session_id": "bad id!"}, KEY_A, 400, "session_id", None),
    ]

    good_result: dict = {}

    def good_stream() -> None:
        chunks = list(server.client().chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "What is 5 plus 5?"}], max_tokens=24,
            stream=True, stream_options={"include_usage": True}, temperature=0))
        good_result["usage"] = chunks[-1].usage

    worker = threading.Thread(target=good_stream)
    worker.start()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda case: server.raw(case[0], case[1], case[2], key=case[3]), cases))
    worker.join(timeout=300)
    for case, (status, body) in zip(cases, answers):
        what = (case[0], case[1], case[2] if not isinstance(case[2], str) else case[2][:40])
        assert status == case[4], (what, body)
        assert _is_openai_error(body), (what, body)
        if case[5] is not None:
            assert body["error"]["param"] == case[5], (what, body)
        if case[6] is not None:
            assert body["error"]["code"] == case[6], (what, body)
    assert good_result["usage"].completion_tokens > 0  # the good request was not disturbed

    # after all that, the server still answers normally
    assert chat(server, max_tokens=3).usage.completion_tokens > 0


def test_openai_client_raises_typed_errors(server):
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-nope").models.list()
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, max_tokens=-1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, "2 plus 2 " * 40, max_tokens=5)
    assert caught.value.code == "context_length_exceeded"


# ---- what needs no server -----------------------------------------------------------------------
def test_engine_errors_map_to_http_statuses():
    from serving.errors import api_error
    from serving.frontend import CHAT_PARAMS
    from engine.generation import EngineError, EngineFailure, Overloaded, PromptTooLong, SessionNotFound

    assert api_error(Overloaded("busy")).status == 429
    assert api_error(SessionNotFound("no")).status == 404
    too_long = api_error(PromptTooLong("long"))
    assert (too_long.status, too_long.code) == (400, "context_length_exceeded")
    assert api_error(EngineError("bad")).status == 400
    failure = api_error(EngineFailure("internal error: boom"))
    assert (failure.status, failure.type) == (500, "server_error")
    assert api_error(PromptTooLong("long", "max_tokens"), CHAT_PARAMS).param == "max_tokens"
    assert api_error(PromptTooLong("long"), CHAT_PARAMS).param == "messages"
    assert api_error(RuntimeError("not the engine's")) is None


def test_serve_config_yaml_is_valid():
    from ray.serve.schema import ServeDeploySchema

    for path in sorted((ROOT / "serving" / "configs").glob("*.yaml")):
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
        assert SERVICER_FUNCTION in config.grpc_options.grpc_servicer_functions
        for app in config.applications:
            assert app.import_path == "serving.app:build"
            AppArgs.model_validate(app.args)


def test_generated_grpc_code_is_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools")
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", "serving/moeray.proto"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in ("moeray_pb2.py", "moeray_pb2.pyi", "moeray_pb2_grpc.py"):
        assert (tmp_path / "serving" / name).read_text() == (ROOT / "serving" / name).read_text(), name


def test_chat_template_comes_from_tokenizer_config(tmp_path):
    from model.tokenizer import ChatTokenizer
    from serving.frontend import Frontend
    from serving.model_info import ModelInfo, load_serving_tokenizer
    from serving.schemas import ChatCompletionRequest

    template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}=>{% endif %}"
    ChatTokenizer(ChatTokenizer.bundled().tokenizer, chat_template=template).save_pretrained(tmp_path)
    tokenizer = load_serving_tokenizer(tmp_path, "auto", 128)
    frontend = Frontend(ModelInfo(name="m", max_model_len=256, vocab_size=128, created=0), tokenizer)
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    )
    assert tokenizer.decode(frontend.chat_prompt(request)) == "[system]be brief[user]hi=>"
    assert load_serving_tokenizer(tmp_path, "none", 128) is None


def test_text_is_detokenized_incrementally_and_held_back_before_a_stop_string():
    from model.tokenizer import ChatTokenizer
    from engine.detokenize import ChoiceText

    def stream(decode, tokens: list[int], stops: list[str]) -> tuple[list[str], bool]:
        text, pieces = ChoiceText(decode, stops), []
        for token in tokens:
            piece, stopped = text.add(token)
            pieces.append(piece)
            if stopped:
                return pieces, True
        return pieces + [text.finish()], False

    tokenizer = ChatTokenizer.bundled()
    ids = tokenizer.encode("hello world, hello moon")
    pieces, stopped = stream(tokenizer.decode, ids, [])
    assert "".join(pieces) == tokenizer.decode(ids) and not stopped
    pieces, stopped = stream(tokenizer.decode, ids, ["lo w", "xyz"])  # spans four tokens
    assert stopped and "".join(pieces) == "hel"
    assert pieces == ["h", "e", "", "l", "", "", ""]  # each "l" waits: it might begin "lo w"
    pieces, stopped = stream(tokenizer.decode, ids, ["lo m"])  # "lo w" looked like it, then did not
    assert stopped and "".join(pieces) == "hello world, hel"

    utf8 = list("née ✓".encode())  # byte tokens: é and ✓ take 2 and 3
    pieces, _ = stream(lambda t: bytes(t).decode("utf-8", errors="replace"), utf8, [])
    assert "".join(pieces) == "née ✓" and "\ufffd" not in "".join(pieces)
    assert pieces[1:3] == ["", "é"]  # the first byte of é waits for the second
