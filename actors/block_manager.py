"""The books of a paged latent cache whose blocks live in several routers; no Ray in here.

A `BlockManager` decides who owns which block: block tables of running sequences, sessions (scoped to
their owner) that keep their blocks between turns, full blocks shared by the hash of their token
prefix (reference counted, never written twice), copy-on-write of a shared partial block, and memory
pressure: least-recently-used idle sessions are offloaded to the first storage tier with room and
restored on their next turn; a session whose router cannot make room for its next turn moves to one
that can. The block contents are reached through a `BlockStore` (the routers' pools) and offloaded
data goes to `OffloadTier`s; the actor around this class supplies the ones that need Ray.

Sessions end when their owner ends them, when they stay idle longer than `session_idle_s`, or when an
owner that holds `max_sessions_per_owner` starts another (its least recently used idle one ends); an
ended session's blocks and offloaded data (a file, on the disk tier) go at once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor


class CacheError(Exception):
    """Something the cache cannot do for this request."""


class CacheFull(CacheError):
    """No room now; finishing requests may make some."""


class CacheTooSmall(CacheError):
    """The request can never fit."""


class SessionNotFound(CacheError):
    """No such session for this owner (sessions belong to whoever created them)."""


class SessionBusy(CacheError):
    """The session has a request running."""


class BlockStore(Protocol):
    """The block pools, one per router, indexed by router number."""

    def export_blocks(self, router: int, blocks: list[int]) -> Tensor: ...

    def import_blocks(self, router: int, blocks: list[int], data: Tensor) -> None: ...

    def copy_blocks(self, router: int, pairs: list[tuple[int, int]]) -> None: ...


class OffloadTier(Protocol):
    """Somewhere to keep an idle session's blocks. `capacity_bytes` None = unbounded."""

    name: str
    capacity_bytes: int | None

    def put(self, key: str, data: Tensor) -> Any: ...

    def take(self, handle: Any) -> Tensor:
        """The data stored under `handle`, forgotten by the tier."""
        ...

    def discard(self, handle: Any) -> None:
        """Forget the data stored under `handle` without reading it."""
        ...


class HostTier:
    """This process's memory."""

    def __init__(self, capacity_bytes: int | None, name: str = "host"):
        self.name, self.capacity_bytes = name, capacity_bytes

    def put(self, key: str, data: Tensor) -> Tensor:
        return data

    def take(self, handle: Tensor) -> Tensor:
        return handle

    def discard(self, handle: Tensor) -> None:
        pass


class DiskTier:
    """One file per session in a folder."""

    def __init__(self, directory: str | Path, capacity_bytes: int | None = None, name: str = "disk"):
        self.name, self.capacity_bytes = name, capacity_bytes
        self.directory = Path(directory)

    def put(self, key: str, data: Tensor) -> str:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{hashlib.sha1(key.encode()).hexdigest()}.pt"
        torch.save(data, path)
        return str(path)

    def take(self, handle: str) -> Tensor:
        data = torch.load(handle, weights_only=True)
        os.remove(handle)
        return data

    def discard(self, handle: str) -> None:
        Path(handle).unlink(missing_ok=True)


def nbytes(data: Tensor) -> int:
    return data.numel() * data.element_size()


def _block_key(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + b"|" + ",".join(map(str, tokens)).encode(), digest_size=16).digest()


@dataclass
class Admission:
    """Where an admitted sequence runs: its router, its block table, and how many prompt tokens are
    already in the cache (not to be prefilled). Copies and restores are done before it is returned."""

    router: int
    block_table: list[int]
    cached_tokens: int


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
    generation: int  # the weights it was computed with (see drop_prefixes): only current ones are cached


@dataclass
class _Offloaded:
    tier: OffloadTier
    handle: Any
    nbytes: int


@dataclass
class _Session:
    router: int
    tokens: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    last_used: float = 0.0
    busy: bool = False
    offloaded: _Offloaded | None = None

    @property
    def idle_resident(self) -> bool:
        return not self.busy and bool(self.blocks) and self.offloaded is None


class BlockManager:
    def __init__(
        self,
        routers: int,
        num_blocks: int,
        block_size: int,
        bytes_per_token: int,
        store: BlockStore,
        tiers: list[OffloadTier],
        session_idle_s: float | None = None,
        max_sessions_per_owner: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`session_idle_s`: end sessions idle this long (None = never); `max_sessions_per_owner`: None =
        no limit; `clock`: seconds, for idle times."""
        self.block_size = block_size
        self.bytes_per_token = bytes_per_token
        self.block_bytes = block_size * bytes_per_token
        self.store = store
        self.tiers = tiers
        self.tier_used = {tier.name: 0 for tier in tiers}
        self.pools = [_Pool(num_blocks) for _ in range(routers)]
        self.sequences: dict[str, _Sequence] = {}
        self.sessions: dict[tuple[str, str], _Session] = {}
        self.session_owner: dict[str, str] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.offloads = 0
        self.restores = 0
        self.moves = 0
        self.generation = 0  # bumped by drop_prefixes
        self.session_idle_s, self.max_sessions_per_owner, self.clock = session_idle_s, max_sessions_per_owner, clock
        self.sessions_ended = {"ended": 0, "expired": 0, "replaced": 0, "lost": 0}

    # ---- admission ------------------------------------------------------------------------------
    def admit(
        self,
        seq_id: str,
        prompt: list[int],
        max_new_tokens: int,
        owner: str = "",
        session_id: str | None = None,
    ) -> Admission:
        """Reserve blocks for prompt + max_new_tokens, after restoring an offloaded session and
        copying a shared partial block (copy-on-write) in the router's pool."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id} is already admitted")
        key = session = None
        if session_id is not None:
            self.check_session(owner, session_id)
            key = (owner, session_id)
            session = self.sessions.get(key)
            if session is not None and session.busy:
                raise CacheFull(f"session {session_id!r} already has a request running")
            if session is None:
                self._limit_sessions(owner)
        total_blocks = -(-(len(prompt) + max_new_tokens) // self.block_size)
        if total_blocks > self.pools[0].num_blocks:
            raise CacheTooSmall(
                f"prompt + max_tokens = {len(prompt) + max_new_tokens} tokens exceed the cache of "
                f"{self.pools[0].num_blocks * self.block_size} tokens per router"
            )
        if session is None:
            router = self._pick_router(prompt)
        else:
            router = self._place_session(session, key, prompt, total_blocks)
        pool = self.pools[router]
        reused, partial, cached = self._reuse(pool, prompt, session)
        try:
            fresh = self._allocate(router, total_blocks - len(reused), exclude=key)
        except CacheFull:
            for block in reused:
                pool.unref(block)
            raise
        if partial:
            self.store.copy_blocks(router, [(partial[0], fresh[0])])
        blocks = reused + fresh
        self.sequences[seq_id] = _Sequence(router, blocks, key, self.generation)
        if key is not None:
            self.session_owner[session_id] = owner
            self.sessions.setdefault(key, _Session(router, last_used=self.clock())).busy = True
        self.prompt_tokens += len(prompt)
        self.cached_tokens += cached
        return Admission(router, blocks, cached)

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

    def _common_tokens(self, session: _Session, prompt: list[int]) -> int:
        """Prompt tokens the session already holds (at least the last prompt token is recomputed)."""
        common, limit = 0, min(len(session.tokens), len(prompt) - 1)
        while common < limit and session.tokens[common] == prompt[common]:
            common += 1
        return common

    def _reuse(self, pool: _Pool, prompt: list[int], session: _Session | None) -> tuple[list[int], list[int], int]:
        """Blocks to share, the partial block to copy, and the cached token count."""
        if session is not None and session.blocks:
            common = self._common_tokens(session, prompt)
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

    # ---- where a session's next turn runs ---------------------------------------------------------
    def _place_session(self, session: _Session, key: tuple[str, str], prompt: list[int], total_blocks: int) -> int:
        """The session's router when it can make room for this turn; else (its blocks shipped or
        restored there) the router with the most room that can; else its router (the turn then waits)."""
        held = len(session.blocks) if session.offloaded is None else self._blocks_for(len(session.tokens))
        fresh = total_blocks - self._common_tokens(session, prompt) // self.block_size
        home = session.router
        needed_at_home = fresh + (held if session.offloaded is not None else 0)
        if self.pools[home].available < needed_at_home and self._room(home, key) < needed_at_home:
            rooms = [(self._room(r, key), -r) for r in range(len(self.pools)) if r != home]
            best = max(rooms, default=None)
            if best is not None and best[0] >= held + fresh:
                self._move(session, key, -best[1])
        if session.offloaded is not None:
            self._restore(session, key)
        return session.router

    def _room(self, router: int, exclude: tuple[str, str] | None) -> int:
        """Blocks this router could provide now, offloading idle sessions (a lower bound: a block
        shared by two idle sessions is not counted)."""
        pool = self.pools[router]
        freeable = sum(
            1
            for key, s in self.sessions.items()
            if s.router == router and s.idle_resident and key != exclude
            for block in s.blocks
            if pool.refs.get(block) == 1
        )
        return pool.available + freeable

    def _move(self, session: _Session, key: tuple[str, str], to_router: int) -> None:
        """Ship an idle session's blocks to another router (latent blocks are small); an offloaded
        one is simply restored there."""
        if session.offloaded is None and session.blocks:
            blocks = self._allocate(to_router, len(session.blocks), exclude=key)  # may raise: nothing moved yet
            self.store.import_blocks(to_router, blocks, self.store.export_blocks(session.router, session.blocks))
            for block in session.blocks:
                self.pools[session.router].unref(block)
            session.blocks = blocks
        session.router = to_router
        self.moves += 1

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- completion -----------------------------------------------------------------------------
    def register_prefix(self, seq_id: str, tokens: list[int]) -> None:
        """Make the full blocks holding these (now computed) tokens reusable by prefix."""
        sequence = self.sequences.get(seq_id)
        if sequence is not None:  # else dropped meanwhile: its router was reset
            self._register(sequence, tokens)

    def _register(self, sequence: _Sequence, tokens: list[int]) -> None:
        if sequence.generation != self.generation:  # computed by weights that have changed since
            return
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
        used = self._blocks_for(len(tokens))
        self._register(sequence, tokens)
        for block in sequence.blocks[used:]:
            pool.unref(block)
        kept = sequence.blocks[:used]
        session = self.sessions.get(sequence.session) if sequence.session is not None else None
        if session is None:
            for block in kept:
                pool.unref(block)
            return
        for block in session.blocks:
            self.pools[session.router].unref(block)
        session.tokens, session.blocks = list(tokens), kept
        session.busy, session.last_used, session.router = False, self.clock(), sequence.router

    def cancel(self, seq_id: str) -> None:
        """Free at once; a session keeps its previous turn."""
        sequence = self.sequences.pop(seq_id, None)
        if sequence is None:
            return
        for block in sequence.blocks:
            self.pools[sequence.router].unref(block)
        session = self.sessions.get(sequence.session) if sequence.session is not None else None
        if session is not None:
            session.busy = False
            if not session.blocks and session.offloaded is None:
                self._end(sequence.session, None)

    def drop_prefixes(self) -> int:
        """Forget every cached prefix (the weights changed, e.g. a GRPO update: the latents are stale);
        sequences running now finish without registering theirs. Returns the blocks freed. Sessions
        keep their turns: an engine whose weights change under live sessions is not supported."""
        self.generation += 1
        freed = 0
        for pool in self.pools:
            freed += len(pool.evictable)
            pool.free.extend(pool.evictable)
            pool.evictable.clear()
            pool.by_key.clear()
            pool.key_of.clear()
        return freed

    # ---- offload and restore --------------------------------------------------------------------
    def _offload_one(self, router: int, exclude: tuple[str, str] | None) -> bool:
        idle = [(s.last_used, key) for key, s in self.sessions.items()
                if s.router == router and s.idle_resident and key != exclude]
        if not idle:
            return False
        _, key = min(idle)
        session = self.sessions[key]
        size = len(session.blocks) * self.block_bytes
        tier = next((t for t in self.tiers if t.capacity_bytes is None
                     or self.tier_used[t.name] + size <= t.capacity_bytes), None)
        if tier is None:
            return False
        data = self.store.export_blocks(router, session.blocks)
        if nbytes(data) != size:
            raise RuntimeError(f"router {router} exported {nbytes(data)} bytes for {size} bytes of blocks")
        session.offloaded = _Offloaded(tier, tier.put(repr(key), data), size)
        self.tier_used[tier.name] += size
        for block in session.blocks:
            self.pools[router].unref(block)
        session.blocks = []
        self.offloads += 1
        return True

    def _restore(self, session: _Session, key: tuple[str, str]) -> None:
        """Blocks on the session's router for its offloaded data, and the data imported into them."""
        offloaded = session.offloaded
        blocks = self._allocate(session.router, self._blocks_for(len(session.tokens)), exclude=key)
        self.store.import_blocks(session.router, blocks, offloaded.tier.take(offloaded.handle))
        self.tier_used[offloaded.tier.name] -= offloaded.nbytes
        session.offloaded, session.blocks = None, blocks
        self.restores += 1

    # ---- sessions -------------------------------------------------------------------------------
    def check_session(self, owner: str, session_id: str) -> None:
        """A session id held by another owner does not exist for this one."""
        self.expire_idle()
        holder = self.session_owner.get(session_id)
        if holder is not None and holder != owner:
            raise SessionNotFound(f"session {session_id!r} not found")

    def sessions_of(self, owner: str) -> list[dict]:
        """The owner's sessions (and no one else's), most recently used first."""
        self.expire_idle()
        now = self.clock()
        mine = sorted(((s.last_used, sid, s) for (o, sid), s in self.sessions.items() if o == owner), reverse=True)
        return [{"id": sid, "tokens": len(s.tokens), "idle_s": round(now - s.last_used, 3), "busy": s.busy,
                 "stored": s.offloaded.tier.name if s.offloaded else "cache"} for _, sid, s in mine]

    def end_session(self, owner: str, session_id: str) -> None:
        """End one of the owner's sessions now: its blocks and offloaded data go."""
        self.check_session(owner, session_id)
        session = self.sessions.get((owner, session_id))
        if session is None:
            raise SessionNotFound(f"session {session_id!r} not found")
        if session.busy:
            raise SessionBusy(f"session {session_id!r} has a request running")
        self._end((owner, session_id), "ended")

    def expire_idle(self) -> None:
        if self.session_idle_s is None:
            return
        cutoff = self.clock() - self.session_idle_s
        for key in [k for k, s in self.sessions.items() if not s.busy and s.last_used < cutoff]:
            self._end(key, "expired")

    def _limit_sessions(self, owner: str) -> None:
        """Room for one more session of this owner: past its limit, its least recently used idle one ends."""
        if self.max_sessions_per_owner is None:
            return
        held = [(s.last_used, key) for key, s in self.sessions.items() if key[0] == owner]
        if len(held) < self.max_sessions_per_owner:
            return
        idle = [(used, key) for used, key in held if not self.sessions[key].busy]
        if not idle:
            raise CacheFull(f"this key holds {len(held)} sessions, all with a request running")
        self._end(min(idle)[1], "replaced")

    def _end(self, key: tuple[str, str], reason: str | None) -> None:
        """Forget a session: its blocks back to the pool, its offloaded data discarded."""
        session = self.sessions.pop(key)
        if self.session_owner.get(key[1]) == key[0]:
            del self.session_owner[key[1]]
        for block in session.blocks:
            self.pools[session.router].unref(block)
        if session.offloaded is not None:
            session.offloaded.tier.discard(session.offloaded.handle)
            self.tier_used[session.offloaded.tier.name] -= session.offloaded.nbytes
        if reason is not None:
            self.sessions_ended[reason] += 1

    # ---- recovery -------------------------------------------------------------------------------
    def reset_router(self, router: int) -> None:
        """The router restarted with an empty pool: forget what these books say it holds. Its running
        sequences are dropped (the engine failed them) and sessions whose blocks were there end; sessions
        offloaded from it keep their data and are restored into the new pool on their next turn."""
        self.pools[router] = _Pool(self.pools[router].num_blocks)
        for seq_id in [s for s, sequence in self.sequences.items() if sequence.router == router]:
            sequence = self.sequences.pop(seq_id)
            if sequence.session in self.sessions:
                self.sessions[sequence.session].busy = False
        for key, session in list(self.sessions.items()):
            if session.router == router and session.offloaded is None:
                session.blocks = []  # nothing to give back: the pool is new
                self._end(key, "lost")

    def adopt(self, sequences: list[tuple[str, int, list[int]]]) -> None:
        """Take over running sequences (seq_id, router, block table) that books now lost were keeping,
        so that their blocks are not handed out again before they finish."""
        for seq_id, router, blocks in sequences:
            pool = self.pools[router]
            for block in blocks:
                if block not in pool.refs:
                    pool.free.remove(block)
                pool.ref(block)
            self.sequences[seq_id] = _Sequence(router, list(blocks), None, self.generation)

    # ---- accounting -----------------------------------------------------------------------------
    def stats(self) -> dict:
        self.expire_idle()
        routers = []
        for index, pool in enumerate(self.pools):
            used = pool.num_blocks - pool.available
            routers.append(
                {
                    "blocks_total": pool.num_blocks,
                    "blocks_used": used,
                    "blocks_cached_idle": len(pool.evictable),
                    "blocks_free": len(pool.free),
                    "bytes_used": used * self.block_bytes,
                    "sessions": sum(1 for s in self.sessions.values() if s.router == index),
                }
            )
        offloaded = {tier.name: 0 for tier in self.tiers}
        for session in self.sessions.values():
            if session.offloaded is not None:
                offloaded[session.offloaded.tier.name] += 1
        return {
            "block_size": self.block_size,
            "bytes_per_token": self.bytes_per_token,
            "routers": routers,
            "running_sequences": len(self.sequences),
            "sessions": len(self.sessions),
            "offloaded_sessions": offloaded,
            "offloaded_bytes": dict(self.tier_used),
            "offloads": self.offloads,
            "restores": self.restores,
            "session_moves": self.moves,
            "sessions_ended": dict(self.sessions_ended),
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
        }
