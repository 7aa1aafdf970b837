"""Tokenizers: tokenizer.json loading, chat templates, and the built-in tokenizer of the tiny models.

A model folder may hold `tokenizer.json` (the `tokenizers` library's format) and `tokenizer_config.json`
with a jinja `chat_template` and the names of the special tokens, as Hugging Face writes them.
`ChatTokenizer` wraps both; `build_char_tokenizer` makes the bundled character-level tokenizer of the
arithmetic model (digits, ASCII characters, a few whole words, and the chat special tokens).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT, SYSTEM]  # ids 0..6

# A turn is its role marker then its content; an assistant turn ends with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Whole-word tokens of the bundled tokenizer (everything else is one token per character).
WORDS = ["What", "is", "Compute", "plus", "minus", "times"]


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The folder's tokenizer.json, or None when it has none (prompts are then token ids)."""
    path = Path(directory) / TOKENIZER_FILE
    return Tokenizer.from_file(str(path)) if path.exists() else None


def has_chat_template(directory: str | Path) -> bool:
    """Whether the folder's tokenizer_config.json names a chat template (a chat model)."""
    path = Path(directory) / TOKENIZER_CONFIG_FILE
    return path.exists() and bool(json.loads(path.read_text()).get("chat_template"))


def build_char_tokenizer(vocab_size: int | None = None) -> Tokenizer:
    """Special tokens (ids 0..6), the words of WORDS, then every printable ASCII character and newline.

    vocab_size pads the vocabulary with unused tokens (a model's embedding may be larger than needed).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *WORDS, "\n", *(chr(c) for c in range(32, 127))]:
        vocab.setdefault(token, len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"the bundled tokenizer needs vocab_size >= {len(vocab)}")
        for i in range(len(vocab), vocab_size):
            vocab[f"<unused{i}>"] = i
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    pattern = "|".join(rf"\b{re.escape(w)}\b" for w in WORDS) + r"|[\s\S]"
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return tokenizer


@functools.lru_cache(maxsize=16)
def _compiled_template(chat_template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)


def apply_chat_template(
    messages: list[dict[str, str]],
    add_generation_prompt: bool = False,
    chat_template: str = CHAT_TEMPLATE,
    **special: Any,
) -> str:
    """Render messages ([{"role", "content"}]) with a jinja chat template, as transformers does."""
    template = _compiled_template(chat_template)
    values = {"bos_token": BOS, "eos_token": EOS, **special}
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **values)


class ChatTokenizer:
    """tokenizer.json + tokenizer_config.json: encode, decode, chat template, assistant-token masks."""

    def __init__(self, tokenizer: Tokenizer, chat_template: str = CHAT_TEMPLATE, **special_tokens: str):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK, **special_tokens}

    # ---- construction and files ---------------------------------------------------------------
    @classmethod
    def bundled(cls, vocab_size: int | None = None) -> "ChatTokenizer":
        return cls(build_char_tokenizer(vocab_size))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ChatTokenizer":
        path = Path(directory)
        tokenizer = load_tokenizer(path)
        if tokenizer is None:
            raise FileNotFoundError(f"{path} has no {TOKENIZER_FILE}")
        config: dict[str, Any] = {}
        if (path / TOKENIZER_CONFIG_FILE).exists():
            config = json.loads((path / TOKENIZER_CONFIG_FILE).read_text())
        special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
        return cls(tokenizer, config.get("chat_template") or CHAT_TEMPLATE, **special)

    def save_pretrained(self, directory: str | Path) -> None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.chat_template,
            "model_max_length": 1_000_000,
            "clean_up_tokenization_spaces": False,
            **self.special,
        }
        (path / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    # ---- ids ----------------------------------------------------------------------------------
    def token_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return token_id

    @property
    def bos_token_id(self) -> int:
        return self.token_id(self.special["bos_token"])

    @property
    def eos_token_id(self) -> int:
        return self.token_id(self.special["eos_token"])

    @property
    def pad_token_id(self) -> int:
        return self.token_id(self.special["pad_token"])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        """Plain encoding: special-token strings in the text become their ids; nothing is added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- chat ---------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return apply_chat_template(messages, add_generation_prompt, self.chat_template, **self.special)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def encode_chats_with_masks(self, conversations: list[list[dict[str, str]]]) -> list[tuple[list[int], list[bool]]]:
        """`encode_chat_with_mask` of many conversations, with one batched encode."""
        texts: list[str] = []
        plans = []
        for messages in conversations:
            spans = []
            for i, message in enumerate(messages):
                if message["role"] == "assistant":
                    texts.append(self.apply_chat_template(messages[:i], add_generation_prompt=True))
                    texts.append(self.apply_chat_template(messages[: i + 1]))
                    spans.append((len(texts) - 2, len(texts) - 1))
            texts.append(self.apply_chat_template(messages))
            plans.append((len(texts) - 1, spans))
        encoded = self.encode_batch(texts)
        results = []
        for full, spans in plans:
            ids = encoded[full]
            mask = [False] * len(ids)
            for start_i, end_i in spans:
                start, end = encoded[start_i], encoded[end_i]
                if ids[: len(end)] != end or end[: len(start)] != start:
                    raise ValueError("the chat template or tokenizer does not render prefixes as prefixes")
                for t in range(len(start), len(end)):
                    mask[t] = True
            results.append((ids, mask))
        return results

    def encode_chat_with_mask(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation, and which of them are assistant tokens (the content of
        each assistant turn and what the template puts after it, e.g. eos): the tokens SFT learns.

        Each assistant turn's tokens are found by rendering the conversation up to the turn with the
        generation prompt, and up to the end of the turn; the template must render prefixes of a
        conversation as prefixes (every usual chat template does) and the tokenizer must encode them
        as prefixes (checked).
        """
        ids = self.encode_chat(messages)
        mask = [False] * len(ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self.encode_chat(messages[:i], add_generation_prompt=True)
            end = self.encode_chat(messages[: i + 1])
            if ids[: len(end)] != end or end[: len(start)] != start:
                raise ValueError("the chat template or tokenizer does not render prefixes as prefixes")
            for t in range(len(start), len(end)):
                mask[t] = True
        return ids, mask
