"""Tokenizer loading from a checkpoint folder: tokenizer.json through the `tokenizers` library."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The folder's tokenizer.json, or None when it has none (prompts are then token ids)."""
    path = Path(directory) / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.exists() else None
