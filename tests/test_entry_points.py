"""The entry points as a user meets them: `moeray serve` started from a script and stopped by a signal,
and one line (no traceback, a non-zero exit) for every user mistake."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from .local_ray import free_port, left_behind, private_ray_env, ray_head

ROOT = Path(__file__).resolve().parents[1]
READY_LINE = "to stop"  # moeray serve's last start-up line: "Ctrl-C (SIGINT) or SIGTERM to stop"
# What a start and a clean stop printed before they were fixed. (Not every WARNING: on a machine loaded
# far beyond its cores, Serve rightly warns that a proxy was slow to start.)
ALARMING = ("Traceback", "SIGTERM received", "graceful_shutdown failed", "will not be applied",
            "Cannot deregister autoscaling state")


class Output:
    """A process's stdout and stderr as they come (a reader thread); `wait_for` a line."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, args=(process.stdout,), daemon=True)
        self.reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()
        with self.changed:
            self.lines.append(None)  # the end
            self.changed.notify_all()

    def wait_for(self, text: str, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: None in self.lines or any(text in line for line in self.lines),
                                         timeout_s) and None not in self.lines

    def text(self) -> str:
        self.reader.join(timeout=30)
        return "\n".join(line for line in self.lines if line is not None)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts `moeray serve &` from a script


@pytest.mark.timeout(300)
def test_without_ray_address_moeray_starts_its_own_cluster_beside_a_ray_start_one():
    """A `ray start` cluster on the machine (maybe someone else's, maybe gone) is joined only when named
    (RAY_ADDRESS); otherwise moeray's embedded cluster starts, as the README says."""
    env, ray_tmpdir = private_ray_env("re")
    with ray_head({**env, "RAY_AUTH_MODE": "disabled"}, ROOT, num_cpus=1) as head:
        # What `ray start` (without --block) leaves behind for an unnamed ray.init() to join.
        (ray_tmpdir / "ray").mkdir()
        (ray_tmpdir / "ray" / "ray_current_cluster").write_text(head.address)
        probe = ("import ray; from cluster.graph import ensure_ray; started = ensure_ray(); "
                 "print(started, ray.get_runtime_context().gcs_address.rsplit(':')[-1])")  # started, GCS port
        head_port = head.address.rsplit(":")[-1]
        done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=240)
        assert done.returncode == 0, done.stderr[-2000:]
        started, address = done.stdout.split()[-2:]
        assert address != head_port and started == "True"
        named = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=240,
                               env={**env, "RAY_ADDRESS": head.address, "RAY_AUTH_MODE": "disabled"})
        assert named.returncode == 0, named.stderr[-2000:]
        assert named.stdout.split()[-2:] == ["False", head_port]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_moeray_serve_started_from_a_script_stops_cleanly_and_leaves_nothing(stop_signal):
    env, ray_temp_dir = private_ray_env("rs")
    port, key = free_port(), "sk-test-signals"
    command = [sys.executable, "-m", "cli", "serve", "--model", "checkpoints/arith-tiny", "--port", str(port),
               "--grpc-port", str(free_port()), "--api-key", key]
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_ignore_sigint)
    output = Output(process)
    try:
        assert output.wait_for(READY_LINE, timeout_s=420), output.text()[-3000:]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models",
                                         headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["data"][0]["id"] == "arith-tiny"
        process.send_signal(stop_signal)
        process.wait(timeout=180)
    finally:
        process.kill()
        leftovers = left_behind(ray_temp_dir, process.pid)
    text = output.text()
    assert process.returncode == 0, text[-3000:]
    assert "moeray: stopping" in text
    assert [line for line in text.splitlines() if any(a in line for a in ALARMING)] == []
    assert leftovers == {}


MISSING = "/nonexistent/moeray-model"
MISTAKES = {
    # id: (command after `python -m`, what the one line must name)
    "generate, no model folder": (["cli", "generate", "--model", MISSING, "--prompt", "hi"], MISSING),
    "generate, bad value": (["cli", "generate", "--model", "checkpoints/arith-tiny", "--prompt", "hi",
                             "--max-tokens", "0"], "--max-tokens"),
    "serve, no model folder": (["cli", "serve", "--model", MISSING], MISSING),
    "serve, negative GPUs": (["cli", "serve", "--model", "checkpoints/arith-tiny", "--gpus-per-actor", "-1"],
                             "--gpus-per-actor"),
    "init, unwritable folder": (["cli", "init", "--out", "/proc/moeray-model"], "/proc/moeray-model"),
    "train sft, no config file": (["cli", "train", "sft", "--config", "/nonexistent/sft.yaml"], "/nonexistent/sft.yaml"),
    "k8s render, unknown overlay": (["cli", "k8s", "render", "--overlay", "nope"], "nope"),
    "jobs.sft, no config file": (["jobs.sft", "--config", "/nonexistent/sft.yaml"], "/nonexistent/sft.yaml"),
    "jobs.sft, unknown key": (["jobs.sft", "--config", "jobs/configs/smoke.yaml", "--set", "stepz=3"], "stepz"),
    "jobs.sft, bad value": (["jobs.sft", "--config", "jobs/configs/smoke.yaml", "--steps", "-1"], "steps"),
    "jobs.sft, broken YAML": (["jobs.sft", "--config", "README.md"], "README.md"),
    "jobs.grpo, no config file": (["jobs.grpo", "--config", "/nonexistent/grpo.yaml"], "/nonexistent/grpo.yaml"),
    "jobs.grpo, unknown key": (["jobs.grpo", "--config", "jobs/configs/grpo-smoke.yaml", "--set", "grpo.betta=0"],
                               "grpo.betta"),
    "jobs.grpo, bad value": (["jobs.grpo", "--config", "jobs/configs/grpo-smoke.yaml", "--set", "group_size=1"],
                             "group_size"),
    "jobs.grpo, no model folder": (["jobs.grpo", "--config", "jobs/configs/grpo-smoke.yaml", "--set",
                                    f"model.init={MISSING}"], MISSING),
    "train grpo, no config file": (["cli", "train", "grpo", "--config", "/nonexistent/grpo.yaml"], "/nonexistent/grpo.yaml"),
    "jobs.eval_arith, no model folder": (["jobs.eval_arith", "--model", MISSING], MISSING),
    "jobs.eval_arith, bad --turns": (["jobs.eval_arith", "--model", "checkpoints/arith-tiny", "--turns", "4-2"],
                                     "--turns"),
    "jobs.eval_arith, no tokenizer": (["jobs.eval_arith", "--model", "checkpoints/tiny-random"], "tokenizer.json"),
    "jobs.data, bad value": (["jobs.data", "arith", "--out", "/tmp", "--max-operand", "0"], "--max-operand"),
    "bench.train, no config file": (["bench.train", "--config", "/nonexistent/sft.yaml"], "/nonexistent/sft.yaml"),
    "bench.long_decode, no model folder": (["bench.long_decode", "--model", MISSING], MISSING),
    "bench.dispatch, bad value": (["bench.dispatch", "--actors", "0"], "'0'"),
    "bench.faults, no model folder": (["bench.faults", "--model", MISSING], MISSING),
    "bench.serving, no model folder": (["bench.serving", "--model", MISSING], MISSING),
    "bench.capacity, a cache smaller than a session": (["bench.capacity", "--cache-blocks", "2"], "--cache-blocks"),
    "bench.soak, bad value": (["bench.soak", "--concurrency", "0"], "--concurrency"),
    "bench.fuzz, bad value": (["bench.fuzz", "--requests", "-1"], "--requests"),
    "bench.long_prompt, bad value": (["bench.long_prompt", "--chunk", "0"], "--chunk"),
    "bench.expert_memory, no MoE layer": (["bench.expert_memory", "--layers", "1"], "--layers"),
    "bench.report, not a bench output": (["bench.report", "README.md"], "README.md"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command, named", MISTAKES.values(), ids=MISTAKES.keys())
def test_a_user_mistake_is_one_line_and_a_failed_exit(command, named):
    env, ray_temp_dir = private_ray_env("re")  # a mistake found late would start Ray: it must not
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=110, start_new_session=True)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    *usage, problem = done.stderr.strip().splitlines()
    assert named in problem and "error" in problem, done.stderr
    assert all(line.startswith(("usage:", " ")) for line in usage), done.stderr  # argparse's usage, if any
    assert left_behind(ray_temp_dir, -1, timeout_s=0) == {}
