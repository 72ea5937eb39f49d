"""``senseflow.parallel.group_blocks``: which consecutive blocks share an FSDP2 unit
(``model.fsdp_blocks_per_unit``); the sharded models themselves are tested in test_engine,
test_shard_disc, test_shard_text and test_compile."""

from __future__ import annotations

import pytest
from torch import nn

from senseflow.parallel import group_blocks


def _blocks(n: int) -> list[nn.Module]:
    return [nn.Linear(2, 2) for _ in range(n)]


def _index(groups, blocks) -> list[list[int]]:
    where = {id(b): i for i, b in enumerate(blocks)}
    return [[where[id(b)] for b in g] for g in groups]


@pytest.mark.parametrize(
    "n, per_unit, want",
    [
        (5, 1, [[0], [1], [2], [3], [4]]),
        (5, 2, [[0, 1], [2, 3], [4]]),  # a trailing partial unit
        (5, 3, [[0, 1, 2], [3, 4]]),
        (4, 4, [[0, 1, 2, 3]]),
        (3, 8, [[0, 1, 2]]),
        (0, 2, []),
    ],
)
def test_consecutive_blocks_in_order(n, per_unit, want):
    blocks = _blocks(n)
    assert _index(group_blocks(blocks, per_unit), blocks) == want


def test_fp32_block_is_alone_and_unit_starts_begin_a_unit():
    blocks = _blocks(7)
    blocks[3].fsdp_compute_fp32 = True  # e.g. DMD2's classifier head
    assert _index(group_blocks(blocks, 3), blocks) == [[0, 1, 2], [3], [4, 5, 6]]
    assert _index(group_blocks(blocks, 2), blocks) == [[0, 1], [2], [3], [4, 5], [6]]
    assert _index(group_blocks(blocks, 4, unit_starts=[blocks[1], blocks[5]]), blocks) == [
        [0],
        [1, 2],
        [3],
        [4],
        [5, 6],
    ]
    assert _index(group_blocks(blocks, 1, unit_starts=[blocks[5]]), blocks) == [[i] for i in range(7)]


def test_per_unit_must_be_positive():
    with pytest.raises(ValueError, match="per_unit"):
        group_blocks(_blocks(2), 0)
