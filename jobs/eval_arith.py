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

from .data import ArithConfig, arith_answer, arith_messages, arith_split


@torch.no_grad()
def evaluate(
    model: DeepseekV2ForCausalLM,
    tokenizer: ChatTokenizer,
    problems: list[tuple[int, str, int]],
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> dict:
    """Exact match of greedy answers (prompts of equal length are decoded together)."""
    model.eval()
    prompts = [tokenizer.encode_chat(arith_messages(*p, with_answer=False), add_generation_prompt=True) for p in problems]
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    answers: list[str] = [""] * len(problems)
    for indices in by_length.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            outputs = model.generate([prompts[i] for i in chunk], max_new_tokens, eos_token_id=tokenizer.eos_token_id)
            for i, tokens in zip(chunk, outputs):
                answers[i] = tokenizer.decode(tokens)
    correct = [answers[i] == arith_answer(*p) for i, p in enumerate(problems)]
    examples = [
        {"question": arith_messages(*p)[0]["content"], "expected": arith_answer(*p), "got": answers[i]}
        for i, p in enumerate(problems[:5])
    ]
    return {"n": len(problems), "exact_match": sum(correct) / max(len(problems), 1), "examples": examples}


def heldout_problems(arith: ArithConfig, n: int | None = None) -> list[tuple[int, str, int]]:
    problems = arith_split(arith)["heldout"]
    return problems if n is None else problems[:n]


def evaluate_folder(model_dir: str | Path, arith: ArithConfig | None = None, n: int | None = None, max_new_tokens: int = 8) -> dict:
    model = DeepseekV2ForCausalLM.from_pretrained(model_dir)
    tokenizer = ChatTokenizer.from_pretrained(model_dir)
    arith = arith or arith_config_of(model_dir)
    start = time.perf_counter()
    result = evaluate(model, tokenizer, heldout_problems(arith, n), max_new_tokens)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.eval_arith", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model folder with tokenizer.json")
    parser.add_argument("--n", type=int, default=None, help="held-out questions to score (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_folder(args.model, n=args.n, max_new_tokens=args.max_new_tokens)
    except FileNotFoundError as error:  # no model folder, or one without a tokenizer
        parser.error(str(error))
    if args.json:
        print(json.dumps(result))
    else:
        print(f"held-out exact match {result['exact_match']:.4f} on {result['n']} questions ({result['seconds']} s)")
        for example in result["examples"]:
            print(f"  {example['question']} -> {example['got']!r} (expected {example['expected']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
