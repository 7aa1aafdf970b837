"""Capacity: four times the sessions the latent cache holds, each continued once, on a server whose
idle sessions go to disk.

    python -m bench.capacity                     # embedded Ray, the random tiny model, 16 blocks of cache

Every session's second turn must give the tokens the one-process model gives for the whole
conversation (as if it had never left the cache) and find all it held in the cache again; the
offload files must be in the configured folder, one per offloaded session, and gone once the sessions
are ended. Prints sessions, offloads, restores, sessions lost, wrong answers and orphan files (files
that outlived their session) as JSON.
The test (tests/test_reliability.py) runs the same scenario and asserts on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import requests

from bench.args import model_folder, positive_int
from serving import moeray_pb2 as pb
from serving import moeray_pb2_grpc as pb_grpc

PROMPT_TOKENS, ANSWER_TOKENS, USER_TOKENS = 30, 4, [4, 5, 6]
SESSION_BLOCKS = 3  # a 16-token block size: 30 prompt + 3 answer tokens held after the first turn


def generate_ids(grpc_target: str, model: str, prompt: list[int], max_tokens: int, key: str,
                 session_id: str = "") -> tuple[list[int], pb.Usage]:
    """Greedy token ids and the usage, through gRPC (its answers carry token ids)."""
    metadata = [("authorization", f"Bearer {key}"), ("application", "moeray")]
    request = pb.GenerateRequest(model=model, prompt_ids=prompt, max_tokens=max_tokens, temperature=0,
                                 session_id=session_id)
    with grpc.insecure_channel(grpc_target) as channel:
        responses = list(pb_grpc.MoerayStub(channel).Generate(request, metadata=metadata, timeout=120))
    return [t.token_id for r in responses for t in r.tokens], responses[-1].usage


def answer_matches(answer: list[int], expected: list[int], eos: set[int]) -> bool:
    """The served answer is the one-process model's (which never stops early: the server may end at an
    end-of-sequence token)."""
    return bool(answer) and answer == expected[: len(answer)] and (len(answer) == len(expected) or answer[-1] in eos)


def run_capacity(base_url: str, grpc_target: str, model: str, key: str, pool_blocks: int,
                 matches_reference: Callable[[list[int], list[int]], bool]) -> dict:
    """`matches_reference(conversation, answer)`: whether the answer is the one-process model's."""
    headers = {"Authorization": f"Bearer {key}"}

    def cache_stats() -> dict:
        return requests.get(f"{base_url}/v1/stats", headers=headers, timeout=60).json()["cache"]

    sessions = 4 * pool_blocks // SESSION_BLOCKS + 1
    before, histories = cache_stats(), {}
    for s in range(sessions):
        prompt = [(s * 7 + i) % 120 + 3 for i in range(PROMPT_TOKENS)]
        answer, _ = generate_ids(grpc_target, model, prompt, ANSWER_TOKENS, key, f"cap-{s}")
        histories[s] = prompt + answer + USER_TOKENS
    mid = cache_stats()
    folder = Path(mid["offload_dir"])  # the manager's own folder under the configured offload_dir
    files = sorted(folder.glob("*.pt"))
    listed = requests.get(f"{base_url}/v1/sessions", headers=headers, timeout=60).json()["data"]
    wrong, not_restored = 0, 0
    for s, history in histories.items():
        answer, usage = generate_ids(grpc_target, model, history, ANSWER_TOKENS, key, f"cap-{s}")
        wrong += not matches_reference(history, answer)
        not_restored += usage.cached_tokens != len(history) - ANSWER_TOKENS  # all it held, back
    end = cache_stats()
    for s in range(sessions):
        requests.delete(f"{base_url}/v1/sessions/cap-{s}", headers=headers, timeout=60)
    after = cache_stats()  # other keys' sessions may still be offloaded: only theirs may keep a file
    return {
        "sessions": sessions, "cache_blocks": pool_blocks, "session_blocks": SESSION_BLOCKS,
        "offloaded_to_disk_after_first_turns": mid["offloaded_sessions"].get("disk", 0),
        "offload_files_after_first_turns": len(files), "offloads": end["offloads"] - before["offloads"],
        "restores": end["restores"] - before["restores"],
        "lost": sessions - len({s["id"] for s in listed} & {f"cap-{s}" for s in range(sessions)}),
        "wrong_answers": wrong, "not_fully_restored": not_restored,
        "orphan_files_after_end": len(list(folder.glob("*.pt"))) - after["offloaded_sessions"]["disk"],
        "sessions_left_after_end": len(requests.get(f"{base_url}/v1/sessions", headers=headers, timeout=60).json()["data"]),
    }


def engine_settings(pool_blocks: int, bytes_per_token: int, offload_dir: str) -> dict:
    """A cache of `pool_blocks` blocks of 16 tokens whose idle sessions go straight to disk."""
    return {"block_size": 16, "cache_bytes_per_router": pool_blocks * 16 * bytes_per_token,
            "host_offload_bytes": 0, "object_store_offload_bytes": 0, "offload_dir": offload_dir}


def main(argv: list[str] | None = None) -> int:
    from model import DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache
    from serving.launch import start, stop
    from serving.model_info import load_serving_tokenizer

    from .served import PROJECT, free_port

    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=model_folder, default=str(PROJECT / "checkpoints" / "tiny-random"))
    parser.add_argument("--cache-blocks", type=positive_int, default=16)
    args = parser.parse_args(argv)
    if args.cache_blocks < SESSION_BLOCKS:
        parser.error(f"--cache-blocks must hold one session ({SESSION_BLOCKS} blocks)")
    model_dir = Path(args.model)
    config = DeepseekV2Config.from_pretrained(model_dir)
    reference = DeepseekV2ForCausalLM.from_pretrained(model_dir)
    eos = set(config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id])
    tokenizer = load_serving_tokenizer(model_dir, "auto", config.vocab_size)
    eos |= {tokenizer.eos_token_id} if tokenizer is not None else set()  # where the server stops, too

    def matches_reference(history: list[int], answer: list[int]) -> bool:
        return answer_matches(answer, reference.generate([history], ANSWER_TOKENS)[0], eos)

    key, grpc_port = "sk-bench-capacity", free_port()
    with tempfile.TemporaryDirectory(prefix="moeray-capacity-") as offload_dir:
        engine = engine_settings(args.cache_blocks, LatentCache.bytes_per_token(config), offload_dir)
        running = start(model_dir, port=free_port(), grpc_port=grpc_port, api_keys=[key], name="bench-capacity",
                        engine=engine, ray_init={"include_dashboard": False}, quiet=True)
        try:
            result = run_capacity(running.base_url.removesuffix("/v1"), f"127.0.0.1:{grpc_port}", running.model, key,
                                  args.cache_blocks, matches_reference)
        finally:
            stop(running)
    print(json.dumps(result))
    clean = not (result["lost"] or result["wrong_answers"] or result["not_fully_restored"] or result["orphan_files_after_end"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
