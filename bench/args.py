"""Argument types the benchmarks share (argparse reports a bad value as a usage error)."""

from __future__ import annotations

import argparse


def positive_ints(text: str) -> list[int]:
    """"1,2,4" -> [1, 2, 4]."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values
