"""Claims on cores: each process takes the cores the fewest live processes hold, and gives them back."""

import json
import os
import subprocess
import sys

import pytest

from actors.cpu_affinity import PinnedCores


@pytest.fixture
def other_processes():
    """One process that has ended and one that is alive, for claims made by others."""
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield ended.pid, alive.pid
    alive.kill()
    alive.wait()


def test_a_process_is_pinned_to_the_cores_the_fewest_live_processes_hold_and_let_go(tmp_path, other_processes):
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip("needs a process allowed on 2 cores or more")
    ended, alive = other_processes
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({str(ended): allowed[1:], str(alive): allowed[:1]}))
    cores = PinnedCores(1, claims)
    try:
        assert cores.hold(True) == [allowed[1]]  # the ended process's claim no longer counts
        assert os.sched_getaffinity(0) == {allowed[1]}
        assert json.loads(claims.read_text()) == {str(alive): allowed[:1], str(os.getpid()): [allowed[1]]}
        assert cores.pin() == [allowed[1]]  # pinning again replaces its own claim, it does not add to it
        assert json.loads(claims.read_text()) == {str(alive): allowed[:1], str(os.getpid()): [allowed[1]]}
    finally:
        assert cores.hold(False) is None
    assert sorted(os.sched_getaffinity(0)) == allowed
    assert json.loads(claims.read_text()) == {str(alive): allowed[:1]}


def test_a_process_wanting_more_cores_than_are_free_shares_the_least_held(tmp_path, other_processes):
    allowed = sorted(os.sched_getaffinity(0))
    _, alive = other_processes
    claims = tmp_path / "claims.json"
    claims.write_text(json.dumps({str(alive): allowed}))  # every core held once already
    cores = PinnedCores(len(allowed) + 1, claims)
    try:
        assert cores.pin() == allowed  # no more cores than the process may use
        assert os.sched_getaffinity(0) == set(allowed)
    finally:
        cores.unpin()
    assert sorted(os.sched_getaffinity(0)) == allowed
