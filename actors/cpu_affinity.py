"""Holding a graph process's threads on cores of its own.

A router and its expert actors hand every message back and forth, and each hand-over wakes a thread of
the other process, and within each process Ray's threads wake one another. When the kernel moves them
between cores, a wake-up may land on another core, which costs tens of microseconds on a virtual
machine; a process whose threads stay on its cores hands over within them, while processes on distinct
cores still compute in parallel. Ray hands out CPU counts, not core ids, so a user's processes on a
machine agree on cores through a claims file: each takes the cores that the fewest live processes hold.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import ray
import torch

CLAIMS_FILE = Path(tempfile.gettempdir()) / f"moeray-core-claims-{os.getuid()}.json"  # one per user: it is writable
CAN_PIN = hasattr(os, "sched_setaffinity")  # Linux; not macOS

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid is now another user's live process
        return True
    return True


def _claim(claims_file: Path, pid: int, cores_wanted: int, allowed: list[int]) -> list[int]:
    """Replaces `pid`'s claim by the `cores_wanted` allowed cores the fewest other live claimants hold,
    dropping the claims of processes that have ended."""
    with open(claims_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        try:
            claims = json.loads(f.read() or "{}")
        except json.JSONDecodeError:  # a writer killed mid-write: its claims are lost, not ours
            claims = {}
        claims = {p: cores for p, cores in claims.items() if int(p) != pid and _alive(int(p))}
        held = Counter(core for cores in claims.values() for core in cores)
        chosen = sorted(sorted(allowed, key=lambda core: (held[core], core))[:cores_wanted])
        claims[str(pid)] = chosen
        f.seek(0)
        f.truncate()
        f.write(json.dumps(claims))
    return chosen


def _set_every_thread(cores: list[int]) -> None:
    """Threads started later inherit the set from the thread that starts them; one that a thread not
    yet moved starts meanwhile is found by the next look."""
    moved: set[str] = set()
    while new := set(os.listdir("/proc/self/task")) - moved:
        for tid in new:
            try:
                os.sched_setaffinity(int(tid), cores)
            except ProcessLookupError:  # a thread that has just ended
                pass
        moved |= new


class PinnedCores:
    """This process's claim on `count` cores (its torch threads'), when it computes on the CPU: a GPU's
    process is left where it is, and so is any process where the OS cannot pin (`CAN_PIN`)."""

    def __init__(self, count: int, device: torch.device, claims_file: Path = CLAIMS_FILE):
        self.count, self.device, self.claims_file = count, device, claims_file
        self.cores: list[int] | None = None
        self.allowed = sorted(os.sched_getaffinity(0)) if CAN_PIN else []  # before any pin

    def pin(self) -> list[int] | None:
        """Claims the cores and moves every thread of this process onto them; the cores, or None."""
        if self.device.type != "cpu" or not CAN_PIN:
            return None
        try:
            cores = _claim(self.claims_file, os.getpid(), self.count, self.allowed)
            _set_every_thread(cores)
        except OSError as error:  # pinning only saves time: a process that cannot pin runs where it is
            logger.warning("could not pin this process's threads to cores (%s); they stay where they are", error)
            return self.cores
        self.cores = cores
        return cores

    def pin_if_restarted(self) -> None:
        """An actor that Ray restarted pins its new process, as `ActorGraph.create` pinned the first."""
        with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated `actor_id`
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:
            self.pin()
