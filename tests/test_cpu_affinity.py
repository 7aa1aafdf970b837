"""Claims on cores: each process takes the cores the fewest live processes hold, with all its threads."""

import json
import os
import subprocess
import sys

import pytest

PIN_IN_A_FRESH_PROCESS = """
import json, os, sys, threading, time
from pathlib import Path
import torch
from actors.cpu_affinity import PinnedCores

claims, count, device = Path(sys.argv[1]), int(sys.argv[2]), torch.device(sys.argv[3])
before = threading.Thread(target=time.sleep, args=(30,), daemon=True)  # a thread older than the pin
before.start()
cores = PinnedCores(count, device, claims)
first = cores.pin()
second = cores.pin()  # pinning again replaces this process's claim, it does not add to it
after = threading.Thread(target=time.sleep, args=(30,), daemon=True)
after.start()
threads = {tid: sorted(os.sched_getaffinity(int(tid))) for tid in os.listdir("/proc/self/task")}
print(json.dumps({"first": first, "second": second, "threads": threads, "pid": os.getpid(),
                  "claims": json.loads(claims.read_text()) if claims.exists() else None}))
"""


def pin_in_a_fresh_process(claims, count: int, device: str = "cpu") -> dict:
    done = subprocess.run([sys.executable, "-c", PIN_IN_A_FRESH_PROCESS, str(claims), str(count), device],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.fixture
def other_processes():
    """One process that has ended and one that is alive, for claims made by others."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield ended.pid, alive.pid
    alive.kill()
    alive.wait()


def test_a_process_takes_the_cores_the_fewest_live_processes_hold_with_every_thread(tmp_path, other_processes):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    ended, alive = other_processes
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({str(ended): allowed[1:], str(alive): allowed[:1]}))
    pinned = pin_in_a_fresh_process(claims, 1)
    assert pinned["first"] == pinned["second"] == [allowed[1]]  # the ended process's claim no longer counts
    assert len(pinned["threads"]) >= 3 and all(cores == [allowed[1]] for cores in pinned["threads"].values())
    assert pinned["claims"] == {str(alive): allowed[:1], str(pinned["pid"]): [allowed[1]]}


def test_a_process_wanting_more_cores_than_it_may_use_gets_them_all(tmp_path, other_processes):
    allowed = sorted(os.sched_getaffinity(0))
    _, alive = other_processes
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({str(alive): allowed[:1]}))
    pinned = pin_in_a_fresh_process(claims, len(allowed) + 1)
    assert pinned["first"] == allowed
    assert all(cores == allowed for cores in pinned["threads"].values())


def test_a_process_computing_on_a_gpu_is_left_where_it_is(tmp_path):
    claims = tmp_path / "claims.json"
    pinned = pin_in_a_fresh_process(claims, 1, "cuda")
    assert pinned["first"] is None and pinned["claims"] is None
    assert all(cores == sorted(os.sched_getaffinity(0)) for cores in pinned["threads"].values())
