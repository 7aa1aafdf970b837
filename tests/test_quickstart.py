"""`moeray quickstart` as a new user runs it (the README's first command): its own embedded Ray cluster,
with the authentication moeray chooses (RAY_AUTH_MODE unset), and every printed answer checked here
again; no warning, no traceback, no process left behind. Also the quickstart's own checks."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli.quickstart import Answers, Demo, Question, _verdict
from jobs.eval_arith import TASK_FILE

from .local_ray import left_behind, private_ray_env

ROOT = Path(__file__).resolve().parents[1]
QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def printed_questions_and_answers(out: str) -> list[tuple[str, str]]:
    """The questions of the '> ...' lines and the answers of the '< ...' lines, in the order printed."""
    questions = [q for line in out.splitlines() if line.startswith("> ") for q in QUESTION.findall(line)]
    answers = []
    for line in out.splitlines():
        if line.startswith("< "):
            answer = re.sub(r"^< (\[\d+\] )?", "", line).split("   (")[0]
            answers.append(answer[1:-1] if answer.startswith("'") else answer)  # completions print repr()
    return list(zip([f"What is {a} {op} {b}?" for a, op, b in questions], answers, strict=True))


@pytest.mark.timeout(600)
def test_quickstart_answers_correctly_quietly_and_leaves_nothing_behind():
    env, ray_temp_dir = private_ray_env("rq")
    process = subprocess.Popen([sys.executable, "-m", "cli", "quickstart"], cwd=ROOT, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=540)
    finally:
        process.kill()
        leftovers = left_behind(ray_temp_dir, process.pid)
    assert process.returncode == 0, out[-3000:] + err[-3000:]
    assert leftovers == {}
    noisy = [line for line in (out + err).splitlines() if "WARNING" in line or "Traceback" in line]
    assert noisy == [], noisy
    asked = printed_questions_and_answers(out)
    assert len(asked) == 5, out
    for question, answer in asked:
        a, op, b = QUESTION.fullmatch(question).groups()
        assert answer == str(OPERATIONS[op](int(a), int(b))), (question, answer)
    assert "all 5 answers correct" in out and "WRONG" not in out
    assert "from the latent cache" in out and "tokens per expert actor" in out


def test_a_wrong_answer_fails_the_quickstart_with_one_line(capsys):
    answers = Answers()
    assert answers.mark(Question("What is 7 + 6?", "13"), "13") == "   (correct)"
    assert "WRONG" in answers.mark(Question("What is 7 + 6?", "13"), "63")
    assert answers.mark(Question("What is 1 + 1?", None), "whatever") == ""  # nothing to check against
    assert _verdict(answers, 1.0) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'What is 7 + 6?' answered '63', expected '13'" in err
    assert _verdict(Answers(checked=2), 1.0) == 0


def test_the_demo_follows_the_models_task_description(tmp_path):
    bundled = Demo.of(ROOT / "checkpoints" / "arith-tiny")
    assert len({q.text for q in bundled.questions}) == 5 and all(q.expected for q in bundled.questions)
    assert bundled.multi_turn  # GRPO on conversations trained it (jobs/configs/arith-tiny-grpo.yaml)
    (tmp_path / TASK_FILE).write_text('{"ops": ["+"]}')
    assert not Demo.of(tmp_path).multi_turn
    assert all(q.expected is None for q in Demo.of(ROOT / "checkpoints" / "tiny-random").questions)
