"""Placement: group-aligned blocks, splitting replicated experts, EPLB-style rebalancing."""

import pytest
import torch
from pydantic import ValidationError

from actors.placement import Placement
from cluster.spec import ClusterSpec


def test_contiguous_placement_keeps_expert_groups_whole():
    placement = Placement.contiguous(n_experts=8, n_actors=2, layers=[1, 2], n_group=4)
    assert placement.experts_of(0) == {1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    assert placement.experts_of(1) == {1: [4, 5, 6, 7], 2: [4, 5, 6, 7]}
    with pytest.raises(ValueError, match="whole groups"):
        Placement.contiguous(n_experts=12, n_actors=3, layers=[1], n_group=4)
    with pytest.raises(ValueError, match="evenly"):
        Placement.contiguous(n_experts=8, n_actors=3, layers=[1])


def test_plan_splits_a_replicated_expert_over_its_copies():
    placement = Placement(n_actors=2, n_experts=3, copies={1: [[0], [0, 1], [1]]})
    plan = placement.plan(1, [2, 5, 1])  # rows 0-1 expert 0, rows 2-6 expert 1, row 7 expert 2
    assert plan.counts == [[2, 3, 0], [0, 2, 1]]
    assert plan.rows(0).tolist() == [0, 1, 2, 3, 4]
    assert plan.rows(1).tolist() == [5, 6, 7]
    assert plan.active_actors == [0, 1]


def test_rebalance_replicates_hot_experts_and_lowers_imbalance():
    placement = Placement.contiguous(n_experts=8, n_actors=4, layers=[1])
    skewed = torch.tensor([900, 40, 30, 20, 10, 10, 5, 5])
    before = placement.actor_load(1, skewed)
    balanced = placement.rebalance({1: skewed}, extra_copies=4)
    after = balanced.actor_load(1, skewed)
    assert len(balanced.copies[1][0]) > 1  # the hot expert has copies
    assert after.max() / after.mean() < before.max() / before.mean()
    # Every actor holds at most its slots, and every expert has at least one copy.
    slots = -(-(8 + 4) // 4)
    assert all(len(ids) <= slots for ids in (balanced.experts_of(a)[1] for a in range(4)))
    assert all(balanced.copies[1][e] for e in range(8))


def test_compiled_transport_needs_a_single_router():
    with pytest.raises(ValueError, match="one compiled graph"):
        ClusterSpec(model="x", routers=2, transport="compiled")


def test_transports_are_a_registry_the_spec_validates_against():
    from actors.transports import TRANSPORTS, ExpertTransport, transport_names

    assert {"objectstore", "compiled"} <= set(transport_names())
    with pytest.raises(ValidationError, match="unknown transport 'carrier-pigeon'"):
        ClusterSpec(model="x", transport="carrier-pigeon")

    class CarrierPigeon(ExpertTransport):  # a subclass with a name registers itself
        name = "carrier-pigeon"

        def send(self, layer, messages, keep_for_backward):
            raise NotImplementedError

    try:
        assert TRANSPORTS["carrier-pigeon"] is CarrierPigeon
        assert ClusterSpec(model="x", transport="carrier-pigeon").router_settings().transport == "carrier-pigeon"
    finally:
        del TRANSPORTS["carrier-pigeon"]
