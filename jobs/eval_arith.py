"""Held-out exact match of the arithmetic chat task: greedy answers until <eos>, compared as strings.

    python -m jobs.eval_arith --model checkpoints/arith-tiny [--n 1000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from pydantic import Field

from model import DeepseekV2ForCausalLM
from model.tokenizer import ChatTokenizer

from .data import ArithConfig, arith_answer, arith_conversations, arith_messages, arith_split


@torch.no_grad()
def greedy_answers(
    model: DeepseekV2ForCausalLM,
    tokenizer: ChatTokenizer,
    conversations: list[list[dict[str, str]]],
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> list[str]:
    """The greedy answer (until <eos>) to the last message of each conversation; prompts of equal
    length are decoded together."""
    model.eval()
    prompts = [tokenizer.encode_chat(messages, add_generation_prompt=True) for messages in conversations]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    answers: list[str] = [""] * len(prompts)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            outputs = model.generate([prompts[i] for i in chunk], max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            for i, tokens in zip(chunk, outputs):
                answers[i] = tokenizer.decode(tokens)
    return answers


def exact_match(
    model: DeepseekV2ForCausalLM,
    tokenizer: ChatTokenizer,
    conversations: list[list[dict[str, str]]],
    expected: list[str],
    max_new_tokens: int = 8,
) -> dict:
    """Share of conversations whose greedy answer to the last question is exactly the expected string."""
    answers = greedy_answers(model, tokenizer, conversations, max_new_tokens)
    correct = [got == want for got, want in zip(answers, expected)]
    examples = [
        {"question": messages[-1]["content"], "turns": sum(m["role"] == "user" for m in messages), "expected": want, "got": got}
        for messages, want, got in list(zip(conversations, expected, answers))[:5]
    ]
    return {"n": len(conversations), "exact_match": sum(correct) / max(len(conversations), 1), "examples": examples}


def evaluate(
    model: DeepseekV2ForCausalLM, tokenizer: ChatTokenizer, problems: list[tuple[int, str, int]], max_new_tokens: int = 8
) -> dict:
    """Exact match of single questions."""
    conversations = [arith_messages(*p, with_answer=False) for p in problems]
    return exact_match(model, tokenizer, conversations, [arith_answer(*p) for p in problems], max_new_tokens)


def evaluate_multi_turn(
    model: DeepseekV2ForCausalLM,
    tokenizer: ChatTokenizer,
    arith: ArithConfig,
    n: int,
    turns: tuple[int, int] = (2, 4),
    max_new_tokens: int = 8,
    seed: int = 0,
) -> dict:
    """Exact match of the last answer of n held-out conversations (earlier turns answered correctly)."""
    pairs = arith_conversations(arith, "heldout", n, seed, *turns)
    result = exact_match(model, tokenizer, [m for m, _ in pairs], [a for _, a in pairs], max_new_tokens)
    return {**result, "turns": list(turns)}


def heldout_problems(arith: ArithConfig, n: int | None = None) -> list[tuple[int, str, int]]:
    problems = arith_split(arith)["heldout"]
    return problems if n is None else problems[:n]


def evaluate_folder(
    model_dir: str | Path,
    arith: ArithConfig | None = None,
    n: int | None = None,
    max_new_tokens: int = 8,
    turns: tuple[int, int] | None = None,
) -> dict:
    """Single questions (turns None; n None = every held-out one) or n held-out conversations of
    turns[0]..turns[1] questions (n None = 200)."""
    model = DeepseekV2ForCausalLM.from_pretrained(model_dir)
    tokenizer = ChatTokenizer.from_pretrained(model_dir)
    arith = arith or arith_config_of(model_dir)
    start = time.perf_counter()
    if turns is None:
        result = evaluate(model, tokenizer, heldout_problems(arith, n), max_new_tokens)
    else:
        result = evaluate_multi_turn(model, tokenizer, arith, n or 200, turns, max_new_tokens)
    return {**result, "seconds": round(time.perf_counter() - start, 2), "model": str(model_dir)}


TASK_FILE = "arith_task.json"


class TrainedTask(ArithConfig):
    """A model folder's arith_task.json: the task it was trained on (jobs.sft writes its data's
    ArithConfig) and what its training taught it beyond single questions."""

    multi_turn: bool = Field(
        False, description="answers the last question of a chat whose earlier questions are answered; set "
        "by the training that teaches it (GRPO on conversations), read by `moeray quickstart`"
    )


def trained_task_of(model_dir: str | Path) -> TrainedTask | None:
    """The task description saved next to the model, or None for a model trained on no such task."""
    path = Path(model_dir) / TASK_FILE
    return TrainedTask.model_validate_json(path.read_text()) if path.exists() else None


def arith_config_of(model_dir: str | Path) -> ArithConfig:
    """The task settings the model was trained with (saved next to it by jobs.sft), else defaults."""
    return trained_task_of(model_dir) or ArithConfig()


def parse_turns(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """--turns MIN-MAX (or N) as (min, max), or a one-line usage error."""
    try:
        low, _, high = text.partition("-")
        turns = (int(low), int(high or low))
    except ValueError:
        parser.error(f"--turns: expected MIN-MAX (e.g. 2-4), got {text!r}")
    if not 1 <= turns[0] <= turns[1]:
        parser.error(f"--turns: need 1 <= MIN <= MAX, got {text!r}")
    return turns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.eval_arith", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder with tokenizer.json")
    parser.add_argument("--n", type=int, default=None, help="held-out questions (default: all) or conversations (200)")
    parser.add_argument("--turns", default=None, metavar="MIN-MAX",
                        help="score the last answer of MIN-MAX-turn conversations, e.g. 2-4 (default: single questions)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    turns = parse_turns(parser, args.turns) if args.turns else None
    try:
        result = evaluate_folder(args.model, n=args.n, max_new_tokens=args.max_new_tokens, turns=turns)
    except FileNotFoundError as error:  # no model folder, or one without a tokenizer
        parser.error(str(error))
    if args.json:
        print(json.dumps(result))
    else:
        what = f"{args.turns}-turn conversations (last answer)" if turns else "questions"
        print(f"held-out exact match {result['exact_match']:.4f} on {result['n']} {what} ({result['seconds']} s)")
        for example in result["examples"]:
            print(f"  {example['question']} -> {example['got']!r} (expected {example['expected']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
