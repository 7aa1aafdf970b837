"""`moeray quickstart`: the bundled model on an embedded Ray cluster behind the OpenAI endpoint, asked
through the official `openai` client what it was trained to answer, and every answer checked.

The questions come from the task description saved next to the model (`arith_task.json`, jobs/):
held-out questions of its task, never trained on, whose answers the task's generator knows. A model
whose training taught it follow-up questions (`"multi_turn": true`) gets a real second turn in its
session; any other model gets a new single question in the session. A wrong answer fails the
quickstart: one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import openai

from jobs.data import ArithConfig, arith_answer, arith_question, arith_split
from jobs.eval_arith import TASK_FILE, TrainedTask, trained_task_of
from model import DeepseekV2Config
from serving.launch import PROJECT, Running, bundled_checkpoint, free_port, start, stop
from serving.model_info import load_serving_tokenizer

from .main import CliError

SESSION = "quickstart"


@dataclass(frozen=True)
class Question:
    text: str
    expected: str | None  # None: nothing says what the model answers, so nothing to check against

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]


@dataclass
class Demo:
    """What the quickstart asks a model: five distinct held-out questions of its task."""

    questions: list[Question]
    trained: bool  # an arith_task.json says what the model was trained to answer
    multi_turn: bool
    about: str

    @classmethod
    def of(cls, model_dir: Path) -> "Demo":
        task = trained_task_of(model_dir)
        problems = arith_split(task or ArithConfig())["heldout"][:5]
        questions = [Question(arith_question(*p), arith_answer(*p) if task else None) for p in problems]
        return cls(questions, task is not None, task is not None and task.multi_turn, _about(task))


def _about(task: TrainedTask | None) -> str:
    if task is None:
        return (f"(no {TASK_FILE} next to this model says what it was trained to answer, so its answers are "
                "shown, not checked)")
    kind = "single questions and follow-ups in a chat" if task.multi_turn else "single questions"
    return (f"the model was trained on {kind} 'What is a {' / '.join(task.ops)} b?' for a, b in "
            f"0..{task.max_operand}; it is asked questions held out of its training, and every answer is checked")


@dataclass
class Answers:
    """How many answers were checked, and what went wrong (wrong answers, a request that failed)."""

    checked: int = 0
    failures: list[str] = field(default_factory=list)

    def mark(self, question: Question, answer: str) -> str:
        """What to print after an answer (nothing when it cannot be checked)."""
        if question.expected is None:
            return ""
        self.checked += 1
        if answer == question.expected:
            return "   (correct)"
        self.failures.append(f"{question.text!r} answered {answer!r}, expected {question.expected!r}")
        return f"   (WRONG: expected {question.expected})"


def quickstart(model_dir: Path | None = None, expert_actors: int = 2, max_tokens: int = 24) -> int:
    """Serve, ask, show the cache and expert statistics, shut down; 0 when every answer was right."""
    started = time.monotonic()
    model_dir = model_dir or bundled_checkpoint()
    demo = Demo.of(model_dir)
    template = _chat_template_of(model_dir)
    api_key = "sk-moeray-" + secrets.token_urlsafe(16)
    shown = model_dir.relative_to(PROJECT) if model_dir.resolve().is_relative_to(PROJECT) else model_dir
    actors = f"{expert_actors} expert actor{'s' if expert_actors != 1 else ''}"
    _say(f"moeray quickstart: {shown} on {actors} + 1 router, Ray Serve in front (embedded Ray)")
    _say(demo.about)
    running = start(  # on CPUs also where there are GPUs: the answers it checks are the fp32 model's
        model_dir, expert_actors=expert_actors, port=free_port(), grpc_port=free_port(), api_keys=[api_key],
        name=f"quickstart-{os.getpid()}", gpus_per_actor=0, ray_init={"include_dashboard": False}, quiet=True,
    )
    answers = Answers()
    try:
        _say(f"endpoint up after {time.monotonic() - started:.0f} s: {running.base_url} "
             f"(OpenAI-compatible; gRPC on port {running.grpc_port})\n")
        client = openai.OpenAI(base_url=running.base_url, api_key=api_key, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        _say(f"GET /v1/models -> {model}\n")
        _ask_chat(client, model, demo.questions[0], answers, max_tokens)
        _ask_in_session(client, model, demo, answers, max_tokens)
        _ask_completions(client, model, demo.questions[3:], template, answers, max_tokens)
        _show_stats(running, api_key)
    except openai.APIError as error:
        answers.failures.append(f"a request failed: {type(error).__name__}: {error}")
    finally:
        _say("\nshutting down ...")
        stop(running)
    return _verdict(answers, time.monotonic() - started)


def _chat_template_of(model_dir: Path):
    """The chat template the server applies, written out as text (for the completions request)."""
    tokenizer = load_serving_tokenizer(model_dir, "auto", DeepseekV2Config.from_pretrained(model_dir).vocab_size)
    if tokenizer is None:
        raise CliError(f"{model_dir} has no tokenizer; the quickstart asks questions in text")
    return lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _stream_chat(client: openai.OpenAI, model: str, messages: list[dict], **extra) -> tuple[str, str]:
    """Stream one greedy chat answer to stdout; (the answer, its usage line)."""
    started, first, parts, usage = time.monotonic(), None, [], None
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, temperature=0,
                                            stream_options={"include_usage": True}, **extra)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.monotonic()
                parts.append(choice.delta.content)
                _say(choice.delta.content, end="")
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    ttft, total = (first or time.monotonic()) - started, time.monotonic() - started
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    generated = usage["completion_tokens"]
    line = (f"    [{usage['prompt_tokens']} prompt tokens ({cached} from the latent cache), {generated} generated, "
            f"first token {ttft * 1000:.0f} ms, {generated / max(total, 1e-9):.1f} tokens/s]")
    return "".join(parts), line


def _ask_chat(client: openai.OpenAI, model: str, question: Question, answers: Answers, max_tokens: int,
              heading: str = "chat (stream)", messages: list[dict] | None = None, **extra) -> str:
    _say(f"> {heading}: {question.text}\n< ", end="")
    answer, usage_line = _stream_chat(client, model, messages or question.messages(), max_tokens=max_tokens, **extra)
    _say(answers.mark(question, answer))
    _say(usage_line)
    return answer


def _ask_in_session(client: openai.OpenAI, model: str, demo: Demo, answers: Answers, max_tokens: int) -> None:
    """Two turns in one session: the second reuses the latent cache the first left."""
    first, second = demo.questions[1], demo.questions[2]
    session = {"extra_body": {"session_id": SESSION}}
    answer = _ask_chat(client, model, first, answers, max_tokens, f"chat in session {SESSION!r}, turn 1", **session)
    if demo.multi_turn:
        heading = "turn 2, a follow-up (the session's latent cache holds turn 1)"
        messages = [*first.messages(), {"role": "assistant", "content": answer}, *second.messages()]
    else:
        reason = (f'its {TASK_FILE} has no "multi_turn": true' if demo.trained
                  else f"no {TASK_FILE} says it was trained on them")
        _say(f"  (follow-ups are not asked: {reason}; so turn 2 is a question of its own, and the session's "
             "latent cache serves the start it shares with turn 1)")
        heading, messages = "turn 2", second.messages()
    _ask_chat(client, model, second, answers, max_tokens, heading, messages, **session)


def _ask_completions(client: openai.OpenAI, model: str, questions: list[Question], template, answers: Answers,
                     max_tokens: int) -> None:
    prompts = [template(question.messages()) for question in questions]
    _say(f"> completions, {len(prompts)} prompts in one request (the chat template written out), greedy: "
         + ", ".join(repr(p) for p in prompts))
    result = client.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0)
    for choice in sorted(result.choices, key=lambda c: c.index):
        _say(f"< [{choice.index}] {choice.text!r}{answers.mark(questions[choice.index], choice.text)}")


def _show_stats(running: Running, api_key: str) -> None:
    request = urllib.request.Request(running.base_url + "/stats", headers={"Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        stats = json.loads(response.read())
    cache = stats.get("cache") or {}
    routers = cache.get("routers") or []
    used, total = sum(r.get("blocks_used", 0) for r in routers), sum(r.get("blocks_total", 0) for r in routers)
    _say(f"\nlatent cache: {used}/{total} blocks of {cache.get('block_size', '?')} tokens in use, "
         f"{cache.get('bytes_per_token', '?')} bytes per token, prefix hit rate {cache.get('hit_rate', 0.0):.0%}, "
         f"{cache.get('sessions', 0)} session(s)")
    _say("experts:")
    layers = ((stats.get("experts") or {}).get("layers") or {}).items()
    for layer, load in sorted(layers, key=lambda item: int(item[0])):
        _say(f"    layer {layer}: tokens per expert actor {load['tokens_per_actor']}, "
             f"imbalance (max/mean) {load['imbalance']:.2f}, actors per token {load['actors_per_token_mean']:.2f}")


def _verdict(answers: Answers, seconds: float) -> int:
    if answers.failures:
        print("moeray quickstart: FAILED: " + "; ".join(answers.failures), file=sys.stderr)
        return 1
    checked = f"all {answers.checked} answers correct" if answers.checked else "answers not checked"
    _say(f"quickstart finished in {seconds:.0f} s: {checked}")
    return 0
