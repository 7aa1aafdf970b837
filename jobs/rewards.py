"""Rewards for GRPO: Python callables named by import path in the config, combined with weights.

A reward function takes one `Completion` and returns a float. The config lists them:

    rewards:
      - {function: jobs.rewards:exact_match, weight: 1.0}
      - {function: jobs.rewards:digit_match, weight: 0.5}
      - {function: mypackage.module:my_reward, weight: 0.2, kwargs: {strict: true}}

and a sample's reward is Σ weight · function(completion, **kwargs) (the V2 recipe's weighted sum of a
task reward and a format reward). Built in, for the arithmetic task: `exact_match`, `digit_match`
(per-digit partial credit, so a group has a signal before any answer is exactly right) and
`bare_number` (the format: digits only, ended by end-of-sequence).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field


class Completion(BaseModel):
    """What a reward function sees of one sampled answer."""

    messages: list[dict[str, str]]  # the prompt's conversation
    text: str  # the decoded answer (special tokens dropped)
    token_ids: list[int]
    finish_reason: Literal["stop", "length"] | None
    expected: str  # the task's reference answer


RewardFunction = Callable[..., float]


def exact_match(completion: Completion) -> float:
    """1 when the answer is exactly the expected string (surrounding spaces ignored), else 0."""
    return float(completion.text.strip() == completion.expected)


def digit_match(completion: Completion) -> float:
    """Per-digit partial credit: the share of place values (units, tens, ...) whose digit is right,
    counted over the longer of answer and expected, so a missing or an extra digit costs as a wrong
    one does. 1 exactly when the answer is right; 0 for anything but a bare non-negative integer."""
    answer = completion.text.strip()
    if not answer.isdigit() or not completion.expected.isdigit():
        return 0.0
    right = sum(a == b for a, b in zip(reversed(answer), reversed(completion.expected)))
    return right / max(len(answer), len(completion.expected))


def bare_number(completion: Completion) -> float:
    """The format reward: 1 when the answer is digits only and the model ended it itself (<eos>)."""
    return float(completion.text.isdigit() and completion.finish_reason == "stop")


class RewardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    function: str = Field(description="import path, 'package.module:name' (or 'package.module.name')")
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of every call")

    @property
    def name(self) -> str:
        return self.function.replace(":", ".").rsplit(".", 1)[-1]


def import_function(path: str) -> RewardFunction:
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"reward function {path!r} cannot be imported: {error}") from None
    if not callable(function):
        raise ValueError(f"reward function {path!r} is not callable")
    return function


class Rewards:
    """The configured reward functions, imported once."""

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ValueError("GRPO needs at least one reward function")
        self.specs = specs
        self.functions = [import_function(spec.function) for spec in specs]

    def score(self, completions: list[Completion]) -> tuple[list[float], dict[str, float]]:
        """The weighted reward of each completion, and each function's mean (unweighted) for the logs."""
        columns = [
            [float(function(c, **spec.kwargs)) for c in completions] for spec, function in zip(self.specs, self.functions)
        ]
        totals = [sum(spec.weight * column[i] for spec, column in zip(self.specs, columns)) for i in range(len(completions))]
        means = {f"reward_{spec.name}": sum(column) / max(len(column), 1) for spec, column in zip(self.specs, columns)}
        return totals, means
