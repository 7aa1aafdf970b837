"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis), against a
running server on loopback:

    python -m bench.fuzz                          # serves the tiny model as `moeray serve` does, 1,000 requests
    python -m bench.fuzz --url http://127.0.0.1:8000 --key KEY --other-key KEY2 --requests 2000

Every operation of /openapi.json gets requests that follow the schema and requests that break it
(bodies, the X-Session-Id header, path parameters), each sent with a valid key, another valid key, a
wrong key or none. Checked for every answer: never a 5xx; an error is OpenAI-shaped
({"error": {message, type, param, code}}), also inside an SSE stream; a 429 or 503 carries Retry-After.
Afterwards a fixed greedy request must still get the answer it got before. Prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass, field

import requests

from bench.args import positive_int

GREEDY_PROBE = {"prompt": [5, 6, 7, 8], "max_tokens": 6, "temperature": 0}


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter = field(default_factory=Counter)
    server_errors: int = 0
    non_openai_errors: int = 0
    missing_retry_after: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, to reproduce
    answers_after: bool = False

    def summary(self) -> dict:
        return {"requests": self.requests, "5xx": self.server_errors, "non_openai_errors": self.non_openai_errors,
                "missing_retry_after": self.missing_retry_after, "answers_correctly_after": self.answers_after,
                "by_status": {str(k): v for k, v in sorted(self.by_status.items())}, "failures": self.failures}

    @property
    def clean(self) -> bool:
        return not (self.server_errors or self.non_openai_errors or self.missing_retry_after) and self.answers_after


def is_openai_error(body: object) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return (isinstance(body, dict) and set(body) == {"error"} and isinstance(error, dict)
            and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"]) and isinstance(error["type"], str))


def problems(response) -> list[str]:
    """What is wrong with one answer (a schemathesis Response: lower-case header names, lists of
    values); empty when nothing."""
    found = []
    if response.status_code >= 500:
        found.append("5xx")
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not is_openai_error(body):
            found.append("non_openai_error")
        if response.status_code in (429, 503) and "retry-after" not in response.headers:
            found.append("missing_retry_after")
    elif response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        for event in response.text.split("\n\n"):
            payload = event.removeprefix("data: ")
            if payload.startswith('{"error"') and not is_openai_error(json.loads(payload)):
                found.append("non_openai_error")
    return found


def fuzz(base_url: str, model: str, keys: list[str], requests_wanted: int, seed: int = 0) -> FuzzReport:
    """About `requests_wanted` generated requests (split over the operations), then the probe."""
    import hypothesis
    import schemathesis
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis import strategies as st
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    before = probe(base_url, model, keys[0])
    report = FuzzReport()
    session = requests.Session()
    # Most requests carry a valid key (the deeper paths need one); the rest none, or any printable text.
    valid = st.sampled_from(keys)
    credentials = st.one_of(valid, valid, valid, st.none(), st.text(st.characters(min_codepoint=33, max_codepoint=126),
                                                                      max_size=40))
    per_operation = -(-requests_wanted // len(operations))
    for operation in operations:
        cases = st.one_of(*(operation.as_strategy(generation_mode=mode) for mode in GenerationMode))

        @hypothesis.seed(seed)
        @settings(max_examples=per_operation, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @hypothesis.given(case=cases, key=credentials, served_model=st.booleans())
        def send(case, key, served_model):
            if served_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = model  # so that a share of the cases gets past the model check
            headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
            response = case.call(base_url=base_url, session=session, headers=headers, timeout=120)
            report.requests += 1
            report.by_status[response.status_code] += 1
            found = problems(response)
            report.server_errors += "5xx" in found
            report.non_openai_errors += "non_openai_error" in found
            report.missing_retry_after += "missing_retry_after" in found
            if found and len(report.failures) < 10:
                report.failures.append(f"{response.status_code} {found}: {case.as_curl_command()} -> {response.text[:300]}")

        send()
    report.answers_after = before is not None and probe(base_url, model, keys[0]) == before
    return report


def probe(base_url: str, model: str, key: str) -> str | None:
    """The greedy answer to a fixed prompt (None when the server does not give one)."""
    response = requests.post(f"{base_url}/v1/completions", json={"model": model, **GREEDY_PROBE},
                             headers={"Authorization": f"Bearer {key}"}, timeout=120)
    return response.json()["choices"][0]["text"] if response.status_code == 200 else None


def fuzz_a_served_model(requests_wanted: int, seed: int) -> FuzzReport:
    """`serving.launch.start` (what `moeray serve` runs) on free loopback ports, two keys, the context
    cut to 128 tokens so that no generated request runs for minutes."""
    from serving.launch import start, stop

    from .served import PROJECT, free_port

    keys = ["sk-bench-fuzz-a", "sk-bench-fuzz-b"]
    running = start(PROJECT / "checkpoints" / "tiny-random", port=free_port(), grpc_port=free_port(), api_keys=keys,
                    name="bench-fuzz", engine={"max_model_len": 128}, ray_init={"include_dashboard": False}, quiet=True)
    try:
        return fuzz(running.base_url.removesuffix("/v1"), running.model, keys, requests_wanted, seed)
    finally:
        stop(running)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (default: start `moeray serve` on free loopback ports)")
    parser.add_argument("--key", help="a valid API key of --url")
    parser.add_argument("--other-key", help="a second valid key of --url (another tenant)")
    parser.add_argument("--model", default="tiny-random", help="the served model name")
    parser.add_argument("--requests", type=positive_int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.url and not args.key:
        parser.error("--url needs --key")
    if args.url:
        report = fuzz(args.url, args.model, [k for k in (args.key, args.other_key) if k], args.requests, args.seed)
    else:
        report = fuzz_a_served_model(args.requests, args.seed)
    print(json.dumps(report.summary()))
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
