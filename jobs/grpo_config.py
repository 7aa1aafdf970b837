"""GRPOConfig: the pydantic-validated YAML of a GRPO job (jobs.grpo), over what every job shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine import EngineConfig
from model.grpo import GRPOSettings

from .config import RunConfig, Schedule
from .data import ArithConfig
from .eval_arith import TrainedTask
from .rewards import RewardSpec


class ConversationTask(BaseModel):
    """Multi-turn arithmetic: min_turns..max_turns questions, the earlier ones answered correctly in
    the prompt, the last one for the policy; prompts only, the rewards check the last answer."""

    model_config = ConfigDict(extra="forbid")

    arith: ArithConfig = Field(default_factory=lambda: ArithConfig(ops=["+"]))
    min_turns: int = Field(2, ge=1)
    max_turns: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _check_turns(self) -> "ConversationTask":
        if self.min_turns > self.max_turns:
            raise ValueError("task: min_turns > max_turns")
        return self


class RolloutSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(8, ge=1)
    temperature: float = Field(1.0, gt=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")


class GRPOEval(BaseModel):
    """Greedy exact match of the policy on held-out questions: every `every` steps through the engine
    (the live weights), and at the end from the final checkpoint in one process."""

    model_config = ConfigDict(extra="forbid")

    every: int = Field(0, ge=0, description="evaluate every N steps at a checkpoint (0 = only at the end)")
    conversations: int = Field(200, ge=0, description="held-out conversations (last answer scored)")
    single_turn: int = Field(1000, ge=0, description="held-out single questions")
    max_new_tokens: int = Field(6, ge=1)


class RolloutEngine(EngineConfig):
    """The serving engine's settings (unknown keys rejected), sized for rollouts: a whole step's
    answers (and an evaluation's questions) in flight at once."""

    model_config = ConfigDict(extra="forbid")

    max_running: int = Field(256, ge=1)
    max_queue: int = Field(4096, ge=1)
    max_batch_tokens: int = Field(2048, ge=1)


def default_rewards() -> list[RewardSpec]:
    return [
        RewardSpec(function="jobs.rewards:exact_match", weight=1.0),
        RewardSpec(function="jobs.rewards:digit_match", weight=0.5),
        RewardSpec(function="jobs.rewards:bare_number", weight=0.1),
    ]


class GRPOConfig(RunConfig):
    """GRPO from a chat model (model.init): rollouts by the serving engine on the actor graph, the
    update on the same routers and expert actors (SPEC §5)."""

    run_dir: str = "runs/grpo"
    schedule: Schedule = Field(default_factory=lambda: Schedule(kind="constant", lr=1e-6, warmup_steps=0))
    task: ConversationTask = Field(default_factory=ConversationTask)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2, description="G: answers sampled per prompt")
    sampling: RolloutSampling = Field(default_factory=RolloutSampling)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)
    updates_per_batch: int = Field(1, ge=1, description="μ: passes of optimizer steps over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass (the batch's outputs split evenly)")
    normalize_std: bool = Field(True, description="divide advantages by the group's std (False: Dr. GRPO)")
    filter_groups: bool = Field(False, description="train only on groups whose rewards differ (DAPO's filter)")
    advantage_eps: float = Field(1e-4, gt=0)
    reference_reset_every: int | None = Field(None, ge=1, description="iterative GRPO: π_ref ← π_θ every N steps")
    rewards: list[RewardSpec] = Field(default_factory=default_rewards)
    eval: GRPOEval = Field(default_factory=GRPOEval)
    engine: RolloutEngine = Field(default_factory=RolloutEngine, description="the rollouts' serving engine")

    @model_validator(mode="after")
    def _check_grpo(self) -> "GRPOConfig":
        if self.expert_actors < 1:
            raise ValueError("GRPO's rollouts run on the actor graph: expert_actors must be at least 1")
        fewest_outputs = self.group_size if self.filter_groups else self.prompts_per_step * self.group_size
        if fewest_outputs // self.minibatches < self.routers:
            raise ValueError(f"a minibatch may hold fewer outputs ({fewest_outputs} // minibatches) than there "
                             f"are routers ({self.routers}): every router needs some")
        if self.prompts_per_step * self.group_size > self.engine.max_queue:
            raise ValueError("a step's answers (prompts_per_step × group_size) exceed engine.max_queue")
        if self.model.init is None:
            raise ValueError("GRPO starts from a model: set model.init to a chat model folder")
        return self

    def arith_task(self) -> TrainedTask:
        """The task, saved next to the model: conversations are what GRPO teaches (`moeray quickstart`
        then asks a follow-up)."""
        return TrainedTask(**self.task.arith.model_dump(), multi_turn=True)
