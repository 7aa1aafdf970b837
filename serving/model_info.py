"""What is served: the model folder, its tokenizer, and what the ingress knows about the model."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

BUNDLED_TOKENIZER_MAX_VOCAB = 4096  # folders without tokenizer.json up to this vocab use the built-in one


def resolve_model_dir(path: str | Path) -> Path:
    """An absolute folder, a folder relative to the working directory, or one relative to this
    project (so configs can say `checkpoints/tiny-random` wherever a replica runs)."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (base / candidate / "config.json").exists():
            return (base / candidate).resolve()
    return candidate.resolve()


def load_serving_tokenizer(model_dir: str | Path, mode: str, vocab_size: int):
    """The folder's tokenizer.json (+ tokenizer_config.json and its chat template); for folders without
    one, the built-in tokenizer of the tiny models when the vocabulary is small enough to be one of
    them; else None (completions then take token-id prompts and chat is unavailable).

    mode: "auto" | "bundled" | "none"."""
    from model.tokenizer import TOKENIZER_FILE, ChatTokenizer, build_char_tokenizer

    directory = Path(model_dir)
    if mode == "none":
        return None
    if mode == "auto" and (directory / TOKENIZER_FILE).exists():
        return ChatTokenizer.from_pretrained(directory)
    bundled_size = build_char_tokenizer().get_vocab_size()
    if mode == "bundled" or (mode == "auto" and bundled_size <= vocab_size <= BUNDLED_TOKENIZER_MAX_VOCAB):
        if vocab_size < bundled_size:
            raise ValueError(f"the built-in tokenizer needs a vocabulary of at least {bundled_size} tokens")
        return ChatTokenizer.bundled(vocab_size)
    return None


class ModelInfo(BaseModel):
    name: str
    max_model_len: int
    vocab_size: int
    created: int
    eos_token_ids: list[int] = []
    has_tokenizer: bool = False
