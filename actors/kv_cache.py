"""LatentKVCacheManager: who owns which latent-cache block, on which router.

The block pools live where attention runs (the routers); this actor keeps the books: block tables of
running sequences, sessions (scoped to their owner) that keep their blocks between turns, full blocks
shared by the hash of their token prefix (reference counted, never written twice), and memory
pressure: least-recently-used idle sessions are offloaded (host memory, then the object store, then a
disk folder) and restored on their next turn. A request that cannot fit gets a clear error.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import ray
import torch
from torch import Tensor


class CacheFull(Exception):
    """No room now; finishing requests may make some."""


class CacheTooSmall(Exception):
    """The request can never fit."""


class SessionNotFound(Exception):
    """No such session for this owner (sessions belong to whoever created them)."""


def _block_key(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()


@dataclass
class _Pool:
    """One router's blocks."""

    num_blocks: int
    free: list[int] = field(default_factory=list)
    refs: dict[int, int] = field(default_factory=dict)
    by_key: dict[bytes, int] = field(default_factory=dict)
    key_of: dict[int, bytes] = field(default_factory=dict)
    evictable: OrderedDict = field(default_factory=OrderedDict)  # cached blocks nobody references, LRU first

    def __post_init__(self):
        self.free = list(range(self.num_blocks - 1, -1, -1))

    def take(self) -> int | None:
        if self.free:
            return self.free.pop()
        if self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_key[self.key_of.pop(block)]
            return block
        return None

    def ref(self, block: int) -> None:
        self.refs[block] = self.refs.get(block, 0) + 1
        self.evictable.pop(block, None)

    def unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block]:
            return
        del self.refs[block]
        if block in self.key_of:
            self.evictable[block] = None  # stays reusable by prefix until its room is needed
        else:
            self.free.append(block)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)


@dataclass
class _Sequence:
    router: int
    blocks: list[int]
    session: tuple[str, str] | None


@dataclass
class _Session:
    router: int
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False
    offloaded: tuple[str, object] | None = None  # (tier, tensor | ObjectRef | path)


class LatentKVCacheManager:
    def __init__(
        self,
        routers: list,
        num_blocks: int,
        block_size: int,
        bytes_per_token: int,
        host_offload_bytes: int = 64 * 1024**2,
        object_store_offload_bytes: int = 64 * 1024**2,
        offload_dir: str | None = None,
    ):
        self.routers = routers
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.block_bytes = block_size * bytes_per_token
        self.pools = [_Pool(num_blocks) for _ in routers]
        self.sequences: dict[str, _Sequence] = {}
        self.sessions: dict[tuple[str, str], _Session] = {}
        self.session_owner: dict[str, str] = {}
        self.tier_budget = {"host": host_offload_bytes, "object_store": object_store_offload_bytes}
        self.tier_used = {"host": 0, "object_store": 0, "disk": 0}
        self.offload_dir = Path(offload_dir or os.path.join(os.getcwd(), ".moeray-offload"))
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.offloads = 0
        self.restores = 0

    # ---- admission ------------------------------------------------------------------------------
    def admit(
        self,
        seq_id: str,
        prompt: list[int],
        max_new_tokens: int,
        owner: str = "",
        session_id: str | None = None,
    ) -> dict:
        """Reserve blocks for prompt + max_new_tokens. Returns the router, the block table, how many
        prompt tokens are already cached (not to be prefilled), blocks to copy (copy-on-write) and
        latent data to restore first."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already admitted")
        key = None
        session = None
        if session_id is not None:
            self.check_session(owner, session_id)
            key = (owner, session_id)
            session = self.sessions.get(key)
            if session is not None and session.busy:
                raise CacheFull(f"session {session_id!r} already has a request running")
        total_blocks = -(-(len(prompt) + max_new_tokens) // self.block_size)
        if total_blocks > self.pools[0].num_blocks:
            raise CacheTooSmall(
                f"prompt + max_tokens = {len(prompt) + max_new_tokens} tokens exceed the cache of "
                f"{self.pools[0].num_blocks * self.block_size} tokens per router"
            )
        router = session.router if session is not None else self._pick_router(prompt)
        pool = self.pools[router]
        restore = None
        if session is not None and session.offloaded is not None:
            restore = self._restore(session, router)
        reused, partial, cached = self._reuse(pool, prompt, session)
        try:
            fresh = self._allocate(router, total_blocks - len(reused), exclude=key)
        except CacheFull:
            for block in reused:
                pool.unref(block)
            raise
        copies = [(partial[0], fresh[0])] if partial else []  # copy-on-write of the partial block
        blocks = reused + fresh
        self.sequences[seq_id] = _Sequence(router, blocks, key)
        if key is not None:
            self.session_owner[session_id] = owner
            self.sessions.setdefault(key, _Session(router)).busy = True
        self.prompt_tokens += len(prompt)
        self.cached_tokens += cached
        return {
            "router": router,
            "block_table": blocks,
            "cached_tokens": cached,
            "copies": copies,
            "restore": restore,
        }

    def _pick_router(self, prompt: list[int]) -> int:
        """Most prefix blocks already cached, then most room."""
        scores = [(len(self._prefix_blocks(pool, prompt)), pool.available, -r) for r, pool in enumerate(self.pools)]
        return -max(scores)[2]

    def _prefix_blocks(self, pool: _Pool, prompt: list[int]) -> list[int]:
        """Cached full blocks of this prompt's prefix; at least the last prompt token is recomputed."""
        found, parent = [], b""
        for start in range(0, len(prompt) - 1 - (len(prompt) - 1) % self.block_size, self.block_size):
            parent = _block_key(parent, prompt[start : start + self.block_size])
            block = pool.by_key.get(parent)
            if block is None:
                break
            found.append(block)
        return found

    def _reuse(self, pool: _Pool, prompt: list[int], session: _Session | None) -> tuple[list[int], list[int], int]:
        """Blocks to share, the partial block to copy, and the cached token count."""
        if session is not None and session.blocks:
            common = 0
            limit = min(len(session.tokens), len(prompt) - 1)
            while common < limit and session.tokens[common] == prompt[common]:
                common += 1
            full = common // self.block_size
            shared = session.blocks[:full]
            partial = [session.blocks[full]] if common % self.block_size else []
        else:
            shared = self._prefix_blocks(pool, prompt)
            common, partial = len(shared) * self.block_size, []
        for block in shared:
            pool.ref(block)
        return shared, partial, common

    def _allocate(self, router: int, count: int, exclude: tuple[str, str] | None) -> list[int]:
        pool = self.pools[router]
        while pool.available < count:
            if not self._offload_one(router, exclude):
                raise CacheFull(
                    f"router {router}: {count} blocks needed, {pool.available} free and no idle session to offload"
                )
        blocks = [pool.take() for _ in range(count)]
        for block in blocks:
            pool.ref(block)
        return blocks

    # ---- completion -----------------------------------------------------------------------------
    def register_prefix(self, seq_id: str, tokens: list[int]) -> None:
        """Make the full blocks holding these (now computed) tokens reusable by prefix."""
        self._register(self.sequences[seq_id], tokens)

    def _register(self, sequence: _Sequence, tokens: list[int]) -> None:
        pool = self.pools[sequence.router]
        parent = b""
        for i in range(len(tokens) // self.block_size):
            parent = _block_key(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = sequence.blocks[i]
            if parent in pool.by_key or block in pool.key_of:
                continue
            pool.by_key[parent] = block
            pool.key_of[block] = parent

    def finish(self, seq_id: str, tokens: list[int]) -> None:
        """The sequence ended holding `tokens` (prompt + output): free its spare blocks; a session keeps
        the rest for its next turn."""
        sequence = self.sequences.pop(seq_id, None)
        if sequence is None:
            return
        pool = self.pools[sequence.router]
        used = -(-len(tokens) // self.block_size)
        self._register(sequence, tokens)
        for block in sequence.blocks[used:]:
            pool.unref(block)
        kept = sequence.blocks[:used]
        if sequence.session is None:
            for block in kept:
                pool.unref(block)
            return
        session = self.sessions[sequence.session]
        for block in session.blocks:
            pool.unref(block)
        session.tokens, session.blocks = list(tokens), kept
        session.busy, session.last_used, session.router = False, time.monotonic(), sequence.router

    def cancel(self, seq_id: str) -> None:
        """Free at once; a session keeps its previous turn."""
        sequence = self.sequences.pop(seq_id, None)
        if sequence is None:
            return
        for block in sequence.blocks:
            self.pools[sequence.router].unref(block)
        if sequence.session is not None:
            session = self.sessions[sequence.session]
            session.busy = False
            if not session.blocks and session.offloaded is None:
                del self.sessions[sequence.session]
                del self.session_owner[sequence.session[1]]

    # ---- offload and restore --------------------------------------------------------------------
    def _offload_one(self, router: int, exclude: tuple[str, str] | None) -> bool:
        idle = [
            (s.last_used, key)
            for key, s in self.sessions.items()
            if s.router == router and not s.busy and s.blocks and s.offloaded is None and key != exclude
        ]
        if not idle:
            return False
        _, key = min(idle)
        session = self.sessions[key]
        data: Tensor = ray.get(self.routers[router].export_blocks.remote(session.blocks))
        size = data.numel() * data.element_size()
        if self.tier_used["host"] + size <= self.tier_budget["host"]:
            session.offloaded = ("host", data)
            tier = "host"
        elif self.tier_used["object_store"] + size <= self.tier_budget["object_store"]:
            session.offloaded = ("object_store", ray.put(data))
            tier = "object_store"
        else:
            self.offload_dir.mkdir(parents=True, exist_ok=True)
            path = self.offload_dir / f"{hashlib.sha1(repr(key).encode()).hexdigest()}.pt"
            torch.save(data, path)
            session.offloaded = ("disk", str(path))
            tier = "disk"
        self.tier_used[tier] += size
        for block in session.blocks:
            self.pools[router].unref(block)
        session.blocks = []
        self.offloads += 1
        return True

    def _restore(self, session: _Session, router: int) -> dict:
        """Blocks for an offloaded session, and the data the router imports into them."""
        tier, payload = session.offloaded
        n_blocks = -(-len(session.tokens) // self.block_size)
        blocks = self._allocate(router, n_blocks, exclude=None)
        if tier == "disk":
            data = torch.load(payload)
            os.remove(payload)
        elif tier == "object_store":
            data = ray.get(payload)
        else:
            data = payload
        self.tier_used[tier] -= data.numel() * data.element_size()
        session.offloaded, session.blocks = None, blocks
        self.restores += 1
        return {"blocks": blocks, "data": data}

    # ---- sessions across routers ----------------------------------------------------------------
    def check_session(self, owner: str, session_id: str) -> None:
        """A session id held by another owner does not exist for this one."""
        holder = self.session_owner.get(session_id)
        if holder is not None and holder != owner:
            raise SessionNotFound(f"session {session_id!r} not found")

    def session_router(self, owner: str, session_id: str) -> int | None:
        session = self.sessions.get((owner, session_id))
        return None if session is None else session.router

    def move_session(self, owner: str, session_id: str, to_router: int) -> None:
        """Ship an idle session's latent blocks to another router (they are small)."""
        session = self.sessions[(owner, session_id)]
        if session.busy:
            raise CacheFull("cannot move a session while it runs")
        if session.router == to_router:
            return
        if session.blocks:
            data = ray.get(self.routers[session.router].export_blocks.remote(session.blocks))
            for block in session.blocks:
                self.pools[session.router].unref(block)
            blocks = self._allocate(to_router, len(session.blocks), exclude=(owner, session_id))
            ray.get(self.routers[to_router].import_blocks.remote(blocks, data))
            session.blocks = blocks
        session.router = to_router

    # ---- accounting -----------------------------------------------------------------------------
    def stats(self) -> dict:
        routers = []
        for pool in self.pools:
            used = pool.num_blocks - pool.available
            routers.append(
                {
                    "blocks_total": pool.num_blocks,
                    "blocks_used": used,
                    "blocks_cached_idle": len(pool.evictable),
                    "blocks_free": len(pool.free),
                    "bytes_used": used * self.block_bytes,
                }
            )
        offloaded: dict[str, int] = {"host": 0, "object_store": 0, "disk": 0}
        for session in self.sessions.values():
            if session.offloaded is not None:
                offloaded[session.offloaded[0]] += 1
        return {
            "block_size": self.block_size,
            "bytes_per_token": self.bytes_per_token,
            "routers": routers,
            "running_sequences": len(self.sequences),
            "sessions": len(self.sessions),
            "offloaded_sessions": offloaded,
            "offloads": self.offloads,
            "restores": self.restores,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
        }
