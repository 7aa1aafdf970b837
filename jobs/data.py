"""Training data: records from Parquet / JSONL (pyarrow) or the synthetic arithmetic task, tokenised into
samples with a loss mask, packed into fixed-length rows, and served in a deterministic order whose
position is one integer (rows consumed), so a resumed run continues exactly where it stopped.

- plain text (pretraining): `<bos> text <eos>`, every token learned; long texts are cut into rows.
- chat (SFT): the chat template renders the messages; only assistant tokens are learned.
- packing: consecutive samples share a row until it is full; a sample never predicts the next one's
  first token. Packed samples see the earlier samples of their row (causal attention over the row, as
  in GPT-style packing; the model's training forward has no document mask).
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from pydantic import BaseModel, Field, ValidationError
from torch import Tensor

from model.tokenizer import ChatTokenizer
from model.training import IGNORE_INDEX


# ---- the synthetic arithmetic chat task -----------------------------------------------------------


class ArithConfig(BaseModel):
    max_operand: int = Field(99, ge=1, description="operands are drawn from 0..max_operand")
    ops: list[Literal["+", "-", "*"]] = Field(default_factory=lambda: ["+", "-"])
    negative_results: bool = Field(False, description="also ask a - b with a < b")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="questions never trained on")
    seed: int = 1234
    system_max_chars: int = Field(
        0, ge=0, description="put each question behind a system message of 0..N random characters, so answers "
        "are learned at varied positions (0 = questions at the start of the row)"
    )


OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def arith_question(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}?"


def arith_answer(a: int, op: str, b: int) -> str:
    return str(OPERATIONS[op](a, b))


def arith_messages(a: int, op: str, b: int, with_answer: bool = True) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": arith_question(a, op, b)}]
    if with_answer:
        messages.append({"role": "assistant", "content": arith_answer(a, op, b)})
    return messages


def arith_split(config: ArithConfig) -> dict[str, list[tuple[int, str, int]]]:
    """Every question (a, op, b) once, split at random (seeded) into train and heldout."""
    operands = range(config.max_operand + 1)
    problems = [
        (a, op, b)
        for op in config.ops
        for a in operands
        for b in operands
        if op != "-" or config.negative_results or a >= b
    ]
    random.Random(config.seed).shuffle(problems)
    n_heldout = max(1, round(len(problems) * config.heldout_fraction))
    return {"heldout": problems[:n_heldout], "train": problems[n_heldout:]}


FILLER_CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " "


def filler_system_message(rng: random.Random, max_chars: int) -> list[dict[str, str]]:
    """A system message of 0..max_chars random printable characters (none when it draws 0): it moves
    the question's position, and its digits are noise the answer must ignore; it is never a question
    nor an answer, so no row shows a conversation."""
    length = rng.randint(0, max_chars)
    return [{"role": "system", "content": "".join(rng.choices(FILLER_CHARACTERS, k=length))}] if length else []


def arith_records(config: ArithConfig, split: str = "train") -> list[dict[str, Any]]:
    """Chat records ({"messages": [...]}) of one split, each behind its (seeded) filler system message
    when config.system_max_chars > 0."""
    rng = random.Random(f"{config.seed}-{split}-filler")
    return [
        {"messages": [*filler_system_message(rng, config.system_max_chars), *arith_messages(*p)]}
        for p in arith_split(config)[split]
    ]


def arith_conversations(
    config: ArithConfig, split: str, n: int, seed: int, min_turns: int = 2, max_turns: int = 4
) -> list[tuple[list[dict[str, str]], str]]:
    """n conversations of min_turns..max_turns questions, with the expected last answer: the earlier
    questions (from the train split) answered correctly, the last one (from `split`) unanswered. A pure
    function of its arguments, so a step of a run (or an evaluation) draws the same conversations again."""
    problems = arith_split(config)
    rng = random.Random(f"{config.seed}-{split}-conversations-{seed}")
    conversations = []
    for _ in range(n):
        earlier = [rng.choice(problems["train"]) for _ in range(rng.randint(min_turns, max_turns) - 1)]
        last = rng.choice(problems[split])
        messages = [m for p in earlier for m in arith_messages(*p)] + arith_messages(*last, with_answer=False)
        conversations.append((messages, arith_answer(*last)))
    return conversations


# ---- records from files ---------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a Parquet or JSONL file (or a folder of them), through pyarrow."""
    import pyarrow as pa
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(f"{path} holds no .parquet / .jsonl files")
        return [record for file in files for record in read_records(file)]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
    elif path.suffix in (".jsonl", ".json"):
        table = pj.read_json(path, read_options=pj.ReadOptions(block_size=1 << 24))
    else:
        raise ValueError(f"{path}: expected .parquet or .jsonl")
    assert isinstance(table, pa.Table)
    return table.to_pylist()


def write_records(records: list[dict[str, Any]], path: str | Path) -> None:
    """Write records as Parquet or JSONL (by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        with open(path, "w") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")


# ---- samples and rows -----------------------------------------------------------------------------


@dataclass
class Sample:
    ids: list[int]
    labels: list[int]  # labels[t] = ids[t+1] when that token is learned, else IGNORE_INDEX; same length as ids


def shifted_labels(ids: list[int], learn: list[bool]) -> list[int]:
    """Next-token labels: position t predicts ids[t+1] when learn[t+1]; the last position predicts nothing."""
    return [ids[t + 1] if learn[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def tokenize_record(
    record: dict[str, Any], tokenizer: ChatTokenizer, fmt: str, text_field: str = "text", messages_field: str = "messages"
) -> Sample:
    if fmt == "chat":
        ids, learn = tokenizer.encode_chat_with_mask(record[messages_field])
    elif fmt == "text":
        ids = [tokenizer.bos_token_id, *tokenizer.encode(record[text_field]), tokenizer.eos_token_id]
        learn = [True] * len(ids)
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return Sample(ids, shifted_labels(ids, learn))


def tokenize_records(
    records: list[dict[str, Any]], tokenizer: ChatTokenizer, fmt: str, text_field: str = "text", messages_field: str = "messages"
) -> list[Sample]:
    """`tokenize_record` over many records, with batched encoding."""
    if fmt == "chat":
        encoded = tokenizer.encode_chats_with_masks([r[messages_field] for r in records])
    elif fmt == "text":
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        encoded = [([bos, *ids, eos], None) for ids in tokenizer.encode_batch([r[text_field] for r in records])]
        encoded = [(ids, [True] * len(ids)) for ids, _ in encoded]
    else:
        raise ValueError(f"unknown data format {fmt!r}")
    return [Sample(ids, shifted_labels(ids, learn)) for ids, learn in encoded]


def split_long(sample: Sample, seq_len: int) -> list[Sample]:
    """Cut a sample longer than a row into row-sized pieces (pretraining text)."""
    return [Sample(sample.ids[i : i + seq_len], sample.labels[i : i + seq_len]) for i in range(0, len(sample.ids), seq_len)]


def pack(samples: list[Sample], seq_len: int, pad_id: int, packing: bool = True) -> tuple[Tensor, Tensor]:
    """Rows [N, seq_len] of input ids and labels. With packing, consecutive samples fill a row until the
    next one does not fit; without, one sample per row. Padding is never learned."""
    rows: list[tuple[list[int], list[int]]] = []
    ids: list[int] = []
    labels: list[int] = []
    for sample in samples:
        for piece in split_long(sample, seq_len):
            if ids and (not packing or len(ids) + len(piece.ids) > seq_len):
                rows.append((ids, labels))
                ids, labels = [], []
            ids, labels = ids + piece.ids, labels + piece.labels
    if ids:
        rows.append((ids, labels))
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        input_ids[r, : len(row_ids)] = torch.tensor(row_ids)
        targets[r, : len(row_labels)] = torch.tensor(row_labels)
    return input_ids, targets


class DataConfig(BaseModel):
    source: Literal["arith", "file"] = "arith"
    path: str | None = Field(None, description="a .parquet / .jsonl file or a folder of them (source=file)")
    format: Literal["chat", "text"] = "chat"
    text_field: str = "text"
    messages_field: str = "messages"
    arith: ArithConfig = Field(default_factory=ArithConfig)
    packing: bool = True


class TrainingData:
    """Rows in a deterministic order: epoch e is the samples shuffled with seed (seed, e), then packed.
    `position` counts the rows consumed; `batches(position)` resumes exactly there."""

    def __init__(self, config: DataConfig, tokenizer: ChatTokenizer, seq_len: int, seed: int):
        self.config, self.seq_len, self.seed = config, seq_len, seed
        self.pad_id = tokenizer.pad_token_id
        if config.source == "arith":
            records = arith_records(config.arith, "train")
        else:
            if config.path is None:
                raise ValueError("data.path is required when data.source is 'file'")
            records = read_records(config.path)
        self.samples = tokenize_records(records, tokenizer, config.format, config.text_field, config.messages_field)
        if not self.samples:
            raise ValueError("no training samples")
        self._epochs: dict[int, tuple[Tensor, Tensor]] = {}

    def epoch(self, e: int) -> tuple[Tensor, Tensor]:
        if e not in self._epochs:
            order = torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            self._epochs = {e: pack([self.samples[i] for i in order.tolist()], self.seq_len, self.pad_id, self.config.packing)}
        return self._epochs[e]

    def batches(self, batch_size: int, position: int = 0) -> Iterator[tuple[Tensor, Tensor, int]]:
        """(input_ids [batch, seq], labels [batch, seq], position after this batch), forever."""
        epoch, offset = 0, position
        while offset >= len(self.epoch(epoch)[0]):
            offset -= len(self.epoch(epoch)[0])
            epoch += 1
        while True:
            ids, labels = [], []
            need = batch_size
            while need:
                rows_ids, rows_labels = self.epoch(epoch)
                take = min(need, len(rows_ids) - offset)
                ids.append(rows_ids[offset : offset + take])
                labels.append(rows_labels[offset : offset + take])
                need -= take
                offset += take
                if offset == len(rows_ids):
                    epoch, offset = epoch + 1, 0
            position += batch_size
            yield torch.cat(ids), torch.cat(labels), position


def main(argv: list[str] | None = None) -> None:
    """`python -m jobs.data arith --out data/arith` writes train.jsonl and heldout.jsonl (or .parquet)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m jobs.data")
    parser.add_argument("task", choices=["arith"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl")
    parser.add_argument("--max-operand", type=int, default=99)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    try:
        config = ArithConfig(max_operand=args.max_operand, seed=args.seed)
    except ValidationError as error:
        parser.error(f"--max-operand: {error.errors()[0]['msg']}")
    for split in ("train", "heldout"):
        path = Path(args.out) / f"{split}.{args.format}"
        try:
            write_records(arith_records(config, split), path)
        except OSError as error:  # --out is not a folder one can write to
            parser.error(str(error))
        print(path)


if __name__ == "__main__":
    main()
