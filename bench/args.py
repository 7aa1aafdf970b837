"""Argument types the benchmarks share (argparse reports a bad value as a usage error: one line, exit 2)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def positive_ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer", lambda value: value >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer ≥ 0", lambda value: value >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a positive number", lambda value: value > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number ≥ 0", lambda value: value >= 0)


def model_folder(text: str) -> str:
    """A folder with a moeray/Hugging Face config.json."""
    from model import DeepseekV2Config

    try:
        DeepseekV2Config.from_pretrained(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _number(text: str, kind: type, expected: str, valid: Callable[[float], bool]) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value
