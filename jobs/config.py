"""TrainConfig: the pydantic-validated YAML of a training job, with command-line overrides."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cluster.spec import GraphShape, TransportChoice
from model.training import AdamWSettings

from .data import ArithConfig, DataConfig


class ModelSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str | None = Field("tiny", description="a DeepseekV2Config preset to initialise from")
    overrides: dict[str, Any] = Field(default_factory=dict, description="config.json keys over the preset")
    init: str | None = Field(None, description="start from this model folder instead (fine-tuning)")
    init_seed: int | None = Field(None, description="seed of the random initialisation (default: seed)")
    tokenizer: str = Field("bundled", description="'bundled' (the built-in char tokenizer) or a folder")


class MoETraining(BaseModel):
    """Balance losses and token dropping (SPEC §2.3-2.4); None keeps the model config's value."""

    model_config = ConfigDict(extra="forbid")

    alpha1: float | None = Field(None, ge=0, description="expert-level balance loss (aux_loss_alpha)")
    alpha2: float | None = Field(None, ge=0, description="device-level balance loss")
    alpha3: float | None = Field(None, ge=0, description="communication balance loss")
    capacity_factor: float | None = Field(None, gt=0, description="device-level token dropping; None = off")
    drop_exempt_fraction: float | None = Field(None, ge=0, le=1)

    def config_overrides(self) -> dict[str, Any]:
        keys = {
            "alpha1": "aux_loss_alpha",
            "alpha2": "device_aux_loss_alpha",
            "alpha3": "comm_aux_loss_alpha",
            "drop_exempt_fraction": "drop_exempt_fraction",
        }
        out = {key: getattr(self, name) for name, key in keys.items() if getattr(self, name) is not None}
        out["capacity_factor"] = self.capacity_factor
        return out


class Schedule(BaseModel):
    """Linear warm-up to `lr`, then V2's step decay (× decay_factor at each fraction of the steps in
    decay_at), cosine down to min_lr_ratio · lr, or constant."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["v2_step", "cosine", "constant"] = "v2_step"
    lr: float = Field(2.4e-4, gt=0)
    warmup_steps: int = Field(2000, ge=0)
    decay_at: list[float] = Field(default_factory=lambda: [0.6, 0.9])
    decay_factor: float = 0.316
    min_lr_ratio: float = Field(0.1, ge=0, le=1)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        if self.kind == "v2_step":
            decays = sum(step >= fraction * total_steps for fraction in self.decay_at)
            return self.lr * self.decay_factor**decays
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    arith_heldout: int = Field(0, ge=0, description="held-out arithmetic questions to score at the end (0 = none)")
    max_new_tokens: int = 8


class RunConfig(GraphShape, TransportChoice):
    """What every training job on the actor graph shares: the model to start from, the optimizer and
    its schedule, the graph's shape, checkpoints and logs. TrainConfig (SFT) and GRPOConfig add theirs."""

    model_config = ConfigDict(extra="forbid")

    run_dir: str = "runs/sft"
    model: ModelSource = Field(default_factory=ModelSource)
    moe: MoETraining = Field(default_factory=MoETraining)
    steps: int = Field(100, ge=1)
    schedule: Schedule = Field(default_factory=Schedule)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.1, ge=0)
    eps: float = 1e-8
    grad_clip: float | None = Field(1.0, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    # The actor graph (GraphShape's and TransportChoice's fields). expert_actors = 0 trains in this one process, without Ray.
    expert_actors: int = Field(2, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch threads of the driver (one-process training)")
    # Checkpoints, logs, export.
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0, description="times the run resumes from its newest checkpoint when a "
                              "process of its graph dies")
    progress: bool = True
    plot: bool = True
    export_dir: str | None = Field(None, description="also write the final model (HF folder + tokenizer) here")

    @model_validator(mode="after")
    def _check_graph_and_model(self) -> "RunConfig":
        if self.expert_actors == 0 and self.routers != 1:
            raise ValueError("one-process training (expert_actors=0) has one rank")
        if self.model.init is None and self.model.preset is None:
            raise ValueError("model: give a preset or an init folder")
        return self

    def adamw(self) -> AdamWSettings:
        """The optimizer every owner of parameters builds (the lr is the schedule's peak; each step
        passes its own)."""
        return AdamWSettings(lr=self.schedule.lr, betas=self.betas, weight_decay=self.weight_decay, eps=self.eps)

    def arith_task(self) -> ArithConfig | None:
        """The synthetic arithmetic task this run trains on, if any (saved next to the model)."""
        return None

    def check_files(self) -> None:
        """The files the config names exist, before any work starts (a ConfigError if not)."""
        init, tokenizer = self.model.init, self.model.tokenizer
        if init is not None and not (Path(init) / "config.json").is_file():
            raise ConfigError(f"model.init: {init} is not a model folder (no config.json)")
        if tokenizer != "bundled" and not (Path(tokenizer) / "tokenizer.json").is_file():
            raise ConfigError(f"model.tokenizer: {tokenizer} has no tokenizer.json (or say 'bundled')")


class TrainConfig(RunConfig):
    """Pretraining / SFT (jobs.sft)."""

    data: DataConfig = Field(default_factory=DataConfig)
    seq_len: int = Field(64, ge=2)
    batch_size: int = Field(32, ge=1, description="rows per optimizer step, split over the routers")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _check_batch(self) -> "TrainConfig":
        if self.batch_size % self.routers:
            raise ValueError(f"batch_size={self.batch_size} must split evenly over routers={self.routers}")
        return self

    def arith_task(self) -> ArithConfig | None:
        return self.data.arith if self.data.source == "arith" else None

    def check_files(self) -> None:
        super().check_files()
        if self.data.source == "file" and self.data.path is None:
            raise ConfigError("data.path: required when data.source is 'file'")
        if self.data.source == "file" and not Path(self.data.path).exists():
            raise ConfigError(f"data.path: {self.data.path} does not exist")


ConfigT = TypeVar("ConfigT", bound=RunConfig)


class ConfigError(ValueError):
    """What is wrong with a job config, in one line that names the key."""


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError(f"cannot set {dotted}: {key} is not a mapping")
    data[keys[-1]] = value


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(error)}") from None
    if not isinstance(data, dict | None):
        raise ConfigError(f"{path}: a config is a mapping of keys to values, not a {type(data).__name__}")
    return data or {}


def _validation_message(error: ValidationError) -> str:
    """The first problem as `key: what is wrong (got value)`, and how many more there are."""
    problems = error.errors(include_url=False)
    first = problems[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    got = "" if first["type"] in ("extra_forbidden", "missing") or not first["loc"] else f" (got {first['input']!r:.80})"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return _one_line(f"{key}: {what}{got}{more}")


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type[ConfigT] = TrainConfig) -> ConfigT:
    """YAML file, then `key.sub=value` overrides (values parsed as YAML), validated by `schema`, the
    files it names checked. Any problem is a ConfigError."""
    data: dict[str, Any] = {} if path is None else _read_yaml(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ConfigError(f"{key.strip()}: the value {value!r} is not valid YAML: {_one_line(error)}") from None
        _set_path(data, key.strip(), parsed)
    try:
        config = schema.model_validate(data)
    except ValidationError as error:
        raise ConfigError(_validation_message(error)) from None
    config.check_files()
    return config


def load_config_or_exit(
    prog: str, path: str | Path | None, overrides: list[str] = (), schema: type[ConfigT] = TrainConfig
) -> ConfigT:
    """`load_config` for a command line: any problem ends the process with one line that names it."""
    try:
        return load_config(path, overrides, schema)
    except (OSError, ConfigError) as error:
        raise SystemExit(f"{prog}: error: {_one_line(error)}") from None


# The command-line flags every job takes besides --set: flag -> config key.
SHORTCUT_FLAGS = {
    "--run-dir": "run_dir", "--steps": "steps", "--seed": "seed", "--expert-actors": "expert_actors",
    "--routers": "routers", "--dtype": "dtype", "--export-dir": "export_dir",
}  # fmt: skip


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments of a training job: --config, --resume, --overwrite, --set KEY=VALUE, shortcuts."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file (jobs/configs/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start over in a run folder that has checkpoints")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    for flag, key in SHORTCUT_FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, help=f"= --set {key}=...")
    return parser


def run_job_command(parser: argparse.ArgumentParser, schema: type[ConfigT], train: Callable[..., dict],
                    argv: list[str] | None) -> int:
    """A training job's command line: its config from `argv`, `train(config, resume=, overwrite=)`, and the
    result as one JSON line on stdout."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = parser.parse_args(argv)
    config = config_from_args(parser, args, schema)
    print(json.dumps(train(config, resume=args.resume, overwrite=args.overwrite)))
    return 0


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, schema: type[ConfigT]) -> ConfigT:
    """The job's config from its parsed arguments; any problem ends the process with one line."""
    overrides = list(args.set) + [
        f"{key}={getattr(args, key)}" for key in SHORTCUT_FLAGS.values() if getattr(args, key) is not None
    ]
    return load_config_or_exit(parser.prog, args.config, overrides, schema)
