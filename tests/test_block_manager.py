"""The cache manager's bookkeeping without Ray: a BlockManager over in-memory block pools."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from actors.block_manager import (
    BlockManager,
    CacheFull,
    CacheTooSmall,
    DiskTier,
    HostTier,
    SessionBusy,
    SessionNotFound,
)

BLOCK = 4
LAYERS, WIDTH = 2, 3  # a block holds [LAYERS, BLOCK, WIDTH] float32 values
BYTES_PER_TOKEN = LAYERS * WIDTH * 4


class MemoryPools:
    """Router pools as the routers hold them; a written token's latent is filled with its token id and
    position, so a block's content says which tokens it holds."""

    def __init__(self, routers: int, num_blocks: int):
        self.pools = [torch.zeros(LAYERS, num_blocks, BLOCK, WIDTH) for _ in range(routers)]
        self.calls: list[tuple[str, int]] = []

    def write(self, router: int, block_table: list[int], tokens: list[int], start: int = 0) -> None:
        for position in range(start, len(tokens)):
            block, offset = block_table[position // BLOCK], position % BLOCK
            self.pools[router][:, block, offset] = torch.tensor([tokens[position], position, 1.0])

    def tokens(self, router: int, block_table: list[int], length: int) -> list[int]:
        return [int(self.pools[router][0, block_table[p // BLOCK], p % BLOCK, 0]) for p in range(length)]

    def export_blocks(self, router: int, blocks: list[int]) -> Tensor:
        self.calls.append(("export", router))
        return self.pools[router][:, blocks].clone()

    def import_blocks(self, router: int, blocks: list[int], data: Tensor) -> None:
        self.calls.append(("import", router))
        self.pools[router][:, blocks] = data

    def copy_blocks(self, router: int, pairs: list[tuple[int, int]]) -> None:
        self.calls.append(("copy", router))
        for source, target in pairs:
            self.pools[router][:, target] = self.pools[router][:, source]


def manager(num_blocks: int = 16, routers: int = 1, tiers: list | None = None, **limits) -> tuple[BlockManager, MemoryPools]:
    pools = MemoryPools(routers, num_blocks)
    tiers = [HostTier(None)] if tiers is None else tiers
    return BlockManager(routers, num_blocks, BLOCK, BYTES_PER_TOKEN, pools, tiers, **limits), pools


class Clock:
    """Seconds that pass when the test says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def run_turn(books: BlockManager, pools: MemoryPools, seq_id: str, prompt: list[int], output: list[int],
             owner: str = "", session_id: str | None = None) -> int:
    """Admit, 'compute' the prompt and all but the last output token, finish; returns the cached count."""
    admission = books.admit(seq_id, prompt, len(output), owner, session_id)
    held = prompt + output[:-1]
    pools.write(admission.router, admission.block_table, held, start=admission.cached_tokens)
    books.register_prefix(seq_id, prompt)
    books.finish(seq_id, held)
    return admission.cached_tokens


def test_full_prefix_blocks_are_shared_by_hash_and_kept_until_their_room_is_needed():
    books, pools = manager(num_blocks=8)
    shared = list(range(10, 19))  # 9 tokens: 2 full blocks
    a = books.admit("a", shared + [1], 2)
    b = books.admit("b", shared + [2], 2)
    assert a.cached_tokens == 0 and b.cached_tokens == 0  # a's prefix is not computed yet
    pools.write(a.router, a.block_table, shared + [1])
    books.register_prefix("a", shared + [1])
    c = books.admit("c", shared + [3, 4], 1)
    assert c.cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]  # the same blocks, not copies
    assert pools.tokens(c.router, c.block_table, 8) == shared[:8]
    stats = books.stats()["routers"][0]
    assert stats["blocks_used"] == 3 + 3 + 1 and stats["bytes_used"] == 7 * BLOCK * BYTES_PER_TOKEN
    for seq_id in ("a", "b", "c"):
        books.cancel(seq_id)
    stats = books.stats()["routers"][0]
    assert stats["blocks_used"] == 0 and stats["blocks_cached_idle"] == 2  # still reusable by prefix
    assert books.admit("d", shared + [5], 2).cached_tokens == 8
    books.cancel("d")
    books.admit("e", list(range(28)), 4)  # needs all 8 blocks: the cached ones are evicted
    assert books.stats()["routers"][0]["blocks_cached_idle"] == 0
    books.cancel("e")
    assert books.admit("f", shared + [5], 2).cached_tokens == 0


def test_dropping_prefixes_forgets_every_cached_block_and_what_runs_across_the_drop():
    """After a weight change (GRPO's update) no prefix may be reused, not even one registered later by
    a sequence computed with the old weights."""
    books, pools = manager(num_blocks=12)
    shared = list(range(10, 19))
    assert run_turn(books, pools, "a", shared + [1], [7, 8]) == 0
    running = books.admit("b", list(range(30, 39)) + [1], 2)
    assert books.stats()["routers"][0]["blocks_cached_idle"] == 2
    assert books.drop_prefixes() == 2
    assert books.stats()["routers"][0]["blocks_cached_idle"] == 0
    pools.write(running.router, running.block_table, list(range(30, 39)) + [1])
    books.register_prefix("b", list(range(30, 39)) + [1])  # computed before the drop: never shared
    books.finish("b", list(range(30, 39)) + [1])
    assert books.admit("c", list(range(30, 39)) + [2], 1).cached_tokens == 0
    assert books.admit("d", shared + [2], 1).cached_tokens == 0
    assert run_turn(books, pools, "e", list(range(50, 59)) + [1], [3]) == 0
    assert books.admit("f", list(range(50, 59)) + [2], 1).cached_tokens == 8  # computed after: shared


def test_requests_that_can_never_fit_and_requests_that_must_wait():
    books, _ = manager(num_blocks=4)
    with pytest.raises(CacheTooSmall):
        books.admit("huge", [1] * 10, 7)  # 17 tokens > 4 blocks of 4
    books.admit("a", [1] * 8, 4)
    with pytest.raises(CacheFull):
        books.admit("b", [2] * 3, 2)  # nothing idle to offload
    with pytest.raises(ValueError):
        books.admit("a", [1], 1)
    books.cancel("a")
    books.admit("b", [2] * 3, 2)
    assert books.stats()["running_sequences"] == 1


def test_a_session_belongs_to_its_owner_keeps_its_turn_and_copies_its_partial_block():
    books, pools = manager()
    first = [5, 6, 7, 8, 9, 10]
    assert run_turn(books, pools, "t1", first, [11, 12, 13], owner="alice", session_id="chat") == 0
    with pytest.raises(SessionNotFound):
        books.check_session("mallory", "chat")
    with pytest.raises(SessionNotFound):
        books.admit("x", [1, 2], 1, owner="mallory", session_id="chat")
    session_blocks = list(books.sessions[("alice", "chat")].blocks)
    second = first + [11, 12, 13, 20, 21]  # the session holds first + [11, 12]: 8 tokens, 2 full blocks
    admission = books.admit("t2", second, 3, owner="alice", session_id="chat")
    assert admission.cached_tokens == 8
    assert admission.block_table[:2] == session_blocks[:2]
    with pytest.raises(CacheFull):  # one turn at a time
        books.admit("t2b", second, 1, owner="alice", session_id="chat")
    books.cancel("t2")  # a cancelled turn leaves the previous one in place
    assert books.sessions[("alice", "chat")].blocks == session_blocks
    third = first + [11, 40, 41]  # diverges inside the session's second block: copy-on-write
    admission = books.admit("t3", third, 2, owner="alice", session_id="chat")
    assert admission.cached_tokens == 7 and ("copy", 0) in pools.calls
    assert admission.block_table[0] == session_blocks[0] and admission.block_table[1] != session_blocks[1]
    assert pools.tokens(0, admission.block_table, 7) == third[:7]  # the copy carries the shared tokens
    assert pools.tokens(0, session_blocks, 8) == (first + [11, 12])  # the original block is untouched


def test_idle_sessions_offload_through_the_tiers_in_order_and_restore_byte_exact(tmp_path: Path):
    block_bytes = BLOCK * BYTES_PER_TOKEN
    tiers = [HostTier(2 * block_bytes), HostTier(2 * block_bytes, name="second"), DiskTier(tmp_path)]
    books, pools = manager(num_blocks=4, tiers=tiers)
    prompts = {s: [s * 10 + j for j in range(6)] for s in range(5)}
    for s, prompt in prompts.items():  # each session holds 7 tokens = 2 blocks; the pool fits 2 sessions
        run_turn(books, pools, f"{s}-1", prompt, [100 + s, 101], owner="k", session_id=f"s{s}")
    stats = books.stats()
    assert stats["offloads"] == 3 and stats["offloaded_sessions"] == {"host": 1, "second": 1, "disk": 1}
    assert stats["offloaded_bytes"] == {"host": 2 * block_bytes, "second": 2 * block_bytes, "disk": 2 * block_bytes}
    assert len(list(tmp_path.iterdir())) == 1
    for s in (2, 1, 0):  # each restore (2 blocks) and its copy-on-write block (1) offload others to disk
        history = prompts[s] + [100 + s, 101]
        admission = books.admit(f"{s}-2", history + [7], 1, owner="k", session_id=f"s{s}")
        assert admission.cached_tokens == 7
        assert pools.tokens(admission.router, admission.block_table, 7) == history[:7]  # what was offloaded
        books.finish(f"{s}-2", history + [7])  # now 3 blocks
    stats = books.stats()
    assert stats["restores"] == 3 and stats["offloads"] == 3 + 2 + 1 + 1
    assert stats["offloaded_sessions"] == {"host": 0, "second": 0, "disk": 4}  # s3, s4 (2 blocks), s2, s1 (3)
    assert stats["offloaded_bytes"] == {"host": 0, "second": 0, "disk": (2 + 2 + 3 + 3) * block_bytes}
    assert len(list(tmp_path.iterdir())) == 4


def test_a_session_whose_router_is_full_moves_to_a_router_with_room():
    books, pools = manager(num_blocks=6, routers=2)
    history = [1, 2, 3, 4, 5, 6]
    run_turn(books, pools, "turn1", history, [7, 8], owner="k", session_id="chat")  # holds 7 tokens on router 0
    run_turn(books, pools, "other", [9, 9, 9], [9, 9], owner="k", session_id="other")  # router 1 had more room
    assert [r["sessions"] for r in books.stats()["routers"]] == [1, 1]
    books.admit("filler", history + [7, 0], 12)  # shares chat's first block and takes the rest of router 0
    assert books.stats()["routers"][0]["blocks_free"] == 0
    admission = books.admit("turn2", history + [7, 8, 30], 2, owner="k", session_id="chat")
    assert admission.router == 1 and admission.cached_tokens == 7
    assert ("export", 0) in pools.calls and ("import", 1) in pools.calls
    assert pools.tokens(1, admission.block_table, 7) == history + [7]
    stats = books.stats()
    assert stats["session_moves"] == 1 and [r["sessions"] for r in stats["routers"]] == [0, 2]
    assert stats["offloads"] == 0


def test_sessions_end_when_told_when_idle_too_long_or_past_their_owners_limit(tmp_path: Path):
    clock = Clock()
    books, pools = manager(num_blocks=4, tiers=[DiskTier(tmp_path)], session_idle_s=60, max_sessions_per_owner=3,
                           clock=clock)
    for s in range(3):  # 2 blocks each in a pool of 4: one of them is offloaded to a file
        clock.now += 1
        run_turn(books, pools, f"a{s}", [s, 1, 2, 3, 4, 5], [6, 7], owner="alice", session_id=f"a{s}")
    a0_file = Path(books.sessions[("alice", "a0")].offloaded.handle)
    assert list(tmp_path.iterdir()) == [a0_file]
    run_turn(books, pools, "b0", [9, 9, 9], [9], owner="bob", session_id="b0")
    assert [s["id"] for s in books.sessions_of("alice")] == ["a2", "a1", "a0"]  # bob's is not listed
    with pytest.raises(SessionNotFound):
        books.end_session("bob", "a1")
    clock.now += 1  # a fourth session of alice ends her least recently used one (a0, on disk); bob's stays
    run_turn(books, pools, "a3", [3, 3, 3], [3], owner="alice", session_id="a3")
    assert [s["id"] for s in books.sessions_of("alice")] == ["a3", "a2", "a1"]
    assert [s["id"] for s in books.sessions_of("bob")] == ["b0"] and not a0_file.exists()
    assert len(list(tmp_path.iterdir())) == books.stats()["offloaded_sessions"]["disk"]
    books.admit("busy", [1, 2, 3, 4], 1, owner="alice", session_id="a1")
    with pytest.raises(SessionBusy):
        books.end_session("alice", "a1")
    books.cancel("busy")
    books.end_session("alice", "a1")
    clock.now += 61  # every session is idle past 60 s now
    assert books.sessions_of("alice") == [] and books.sessions_of("bob") == []
    stats = books.stats()
    assert stats["sessions_ended"] == {"ended": 1, "expired": 3, "replaced": 1, "lost": 0}
    assert stats["routers"][0]["blocks_used"] == 0 and stats["offloaded_bytes"]["disk"] == 0
    assert not list(tmp_path.iterdir())  # no session left, no file left


def test_a_reset_router_forgets_its_blocks_and_new_books_adopt_running_sequences(tmp_path: Path):
    books, pools = manager(num_blocks=8, routers=2)
    run_turn(books, pools, "t1", [1, 2, 3, 4, 5], [6, 7], owner="k", session_id="here")
    running = books.admit("run", [8, 8, 8, 8, 8], 3)
    books.reset_router(0)  # router 0 restarted with an empty pool
    assert books.sessions_of("k") == [] and books.stats()["sessions_ended"]["lost"] == 1
    assert books.admit("next", [1, 2, 3, 4, 5, 6, 7, 9], 1, owner="k", session_id="here").cached_tokens == 0
    books.finish("run", [8] * 7)  # a sequence the reset dropped: nothing to do
    fresh, _ = manager(num_blocks=8, routers=2)
    fresh.adopt([("run", running.router, running.block_table)])
    first, second = fresh.admit("x", list(range(20, 40)), 4), fresh.admit("y", list(range(40, 60)), 4)  # 6 blocks each
    beside = first if first.router == running.router else second
    assert first.router != second.router and not set(beside.block_table) & set(running.block_table)
    with pytest.raises(CacheFull):  # the adopted blocks stay taken
        fresh.admit("z", list(range(60, 70)), 2)
