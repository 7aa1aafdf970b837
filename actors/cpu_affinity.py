"""Holding a process's threads on cores of its own while a compiled graph stands.

A compiled graph's router and expert actors hand every message over through shared memory and wake
each other by spinning. When the kernel moves them between cores, each hand-over may wake a thread on
another core, which costs tens of microseconds on a virtual machine; a process whose threads stay on
its cores hands over within them, while processes on distinct cores still compute in parallel. Ray
hands out CPU counts, not core ids, so a user's processes on a machine agree on cores through a claims
file: each takes the cores that the fewest live processes hold.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections import Counter
from pathlib import Path

CLAIMS_FILE = Path(tempfile.gettempdir()) / f"moeray-core-claims-{os.getuid()}.json"  # one per user: it is writable

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # the pid is now another user's live process
        return True
    return True


def _update_claims(claims_file: Path, pid: int, cores_wanted: int, allowed: list[int]) -> list[int]:
    """Replaces `pid`'s claim by the `cores_wanted` allowed cores the fewest other live claimants hold
    (none when `cores_wanted` is 0), dropping the claims of processes that have ended."""
    with open(claims_file, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        f.seek(0)
        try:
            claims = json.loads(f.read() or "{}")
        except json.JSONDecodeError:  # a writer killed mid-write: its claims are lost, not ours
            claims = {}
        claims = {p: cores for p, cores in claims.items() if int(p) != pid and _alive(int(p))}
        held = Counter(core for cores in claims.values() for core in cores)
        chosen = sorted(allowed, key=lambda core: (held[core], core))[:cores_wanted]
        if chosen:
            claims[str(pid)] = chosen
        f.seek(0)
        f.truncate()
        f.write(json.dumps(claims))
    return sorted(chosen)


def _set_every_thread(cores: set[int] | list[int]) -> None:
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
    """This process's claim on `count` cores (its torch threads'): `pin` moves every thread onto them,
    `unpin` gives the threads back the set they had. Nothing happens where the OS cannot pin (not Linux)."""

    def __init__(self, count: int, claims_file: Path = CLAIMS_FILE):
        self.count, self.claims_file = count, claims_file
        self.cores: list[int] | None = None
        self._allowed: set[int] | None = None  # the threads' set before the first pin

    def hold(self, pinned: bool) -> list[int] | None:
        """Pins or unpins; the cores held after."""
        if pinned:
            self.pin()
        else:
            self.unpin()
        return self.cores

    def pin(self) -> list[int] | None:
        if not hasattr(os, "sched_setaffinity"):
            return None
        if self._allowed is None:
            self._allowed = os.sched_getaffinity(0)
        try:
            cores = _update_claims(self.claims_file, os.getpid(), self.count, sorted(self._allowed))
            _set_every_thread(cores)
        except OSError as error:  # pinning only saves time: a process that cannot pin runs where it is
            logger.warning("could not pin this process's threads to cores (%s); they stay where they are", error)
            return self.cores
        self.cores = cores
        return self.cores

    def unpin(self) -> None:
        if self.cores is None:
            return
        _update_claims(self.claims_file, os.getpid(), 0, [])
        _set_every_thread(self._allowed)
        self.cores = None
