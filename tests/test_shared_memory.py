"""Large expert messages through a shared-memory file: both ends, growth, cleanup, refusal."""

import glob
import os

import pytest
import torch

from actors.shared_memory import (
    MIN_BYTES,
    SharedFiles,
    SharedLink,
    SharedMemoryOnAnotherNode,
    SharedMemoryUnavailable,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this machine")

NODE, ROUTER = "node-a", "router-1"


def rows(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, 64, generator=torch.Generator().manual_seed(n)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_message_and_its_answer_travel_through_one_file_that_is_unlinked_after(dtype):
    link, files = SharedLink(NODE, ROUTER, 0), SharedFiles(NODE)
    tokens = rows(512, dtype)
    message = link.send(tokens)
    assert message is not None and os.path.exists(message.path)
    received = files.tensor(message)
    assert torch.equal(received, tokens)
    assert not os.path.exists(message.path)  # mapped by both ends, the name is gone
    answer = files.answer(message, received * 2)
    assert torch.equal(link.answer(answer), tokens * 2)

    again = link.send(rows(256, dtype))  # the same mapping, without a name: still works
    assert again.path == message.path
    assert torch.equal(link.answer(files.answer(again, files.tensor(again) + 1)), rows(256, dtype) + 1)


def test_a_larger_message_gets_a_larger_file_and_the_receiver_follows():
    link, files = SharedLink(NODE, ROUTER, 0), SharedFiles(NODE)
    first = link.send(rows(128))
    link.answer(files.answer(first, files.tensor(first)))
    larger = link.send(rows(4096))
    assert larger.path != first.path
    assert torch.equal(files.tensor(larger), rows(4096))
    assert len(files.mapped) == 1  # the older file of that router is released
    assert not glob.glob(link.prefix + "-*")


def test_a_restarted_router_s_files_replace_its_predecessor_s_at_the_actor():
    files = SharedFiles(NODE)
    for sender in (ROUTER, ROUTER, "router-2"):  # the same router twice (a restart keeps its id), another
        link = SharedLink(NODE, sender, 0)
        message = link.send(rows(512))
        link.answer(files.answer(message, files.tensor(message)))
    assert sorted(files.mapped) == [ROUTER, "router-2"]
    assert files.mapped[ROUTER][0] != files.mapped["router-2"][0]


def test_small_messages_and_a_second_message_in_flight_travel_inline():
    link = SharedLink(NODE, ROUTER, 0)
    assert link.send(torch.zeros(MIN_BYTES // 4 - 1)) is None
    assert link.send(rows(512)) is not None
    assert link.send(rows(512)) is None  # the first one's answer is not read yet
    link.failed()
    assert link.send(rows(512)) is not None  # after a failed call: a new file
    link.failed()
    assert not glob.glob(link.prefix + "-*")


def test_a_message_whose_answer_is_never_read_frees_the_file_once_its_call_is_done():
    link = SharedLink(NODE, ROUTER, 0)
    assert link.send(rows(512)) is not None
    done = False
    link.carried_by(lambda: done)
    assert link.send(rows(512)) is None  # its call is still running
    done = True  # done, but the router never read the answer
    assert link.send(rows(512)) is not None
    link.failed()


def test_an_actor_that_cannot_map_the_file_refuses_and_the_router_stops_or_starts_afresh():
    link = SharedLink(NODE, ROUTER, 0)
    message = link.send(rows(512))
    with pytest.raises(SharedMemoryOnAnotherNode):
        SharedFiles("node-b").tensor(message)
    link.failed(SharedMemoryOnAnotherNode("elsewhere"))
    assert link.send(rows(512)) is None  # that actor is on another node: inline from now on

    link = SharedLink(NODE, ROUTER, 1)
    message = link.send(rows(512))
    link.failed()  # e.g. the call died: the file is unlinked; a restarted actor cannot map it
    with pytest.raises(SharedMemoryUnavailable):
        SharedFiles(NODE).tensor(message)
    assert link.send(rows(512)) is not None  # but the same node: a new file next time
    link.failed()
