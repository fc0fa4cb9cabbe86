"""The block manager alone: pure bookkeeping on plain sequence stand-ins, no model and no tensors."""

import pytest

from lmforge.engine.block_manager import BlockManager


class Seq:
    def __init__(self, token_ids):
        self.token_ids = list(token_ids)
        self.block_table = []
        self.num_computed_tokens = 0
        self.num_hashed_blocks = 0


def admit(bm, seq):
    """What the scheduler does for a new sequence: take prefix hits, then slots for the rest, computed at once."""
    hits = bm.match_prefix(seq.token_ids)
    assert bm.allocate_slots(seq, len(seq.token_ids) - len(hits) * bm.block_size, hits)
    seq.num_computed_tokens = len(seq.token_ids)
    bm.cache_blocks(seq)
    return hits


def test_allocate_takes_just_enough_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Seq(range(9))  # 9 tokens -> 3 blocks
    assert bm.allocate_slots(seq, 9)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5 and bm.num_used_blocks == 3
    seq.num_computed_tokens = 9
    assert bm.allocate_slots(seq, 3)  # slots 9..11 fit in the third block
    assert len(seq.block_table) == 3
    assert bm.allocate_slots(seq, 4)  # slot 12 opens a fourth
    assert len(seq.block_table) == 4
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_allocation_fails_without_changing_anything_when_the_pool_is_short():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = Seq(range(12)), Seq(range(100, 108))
    assert bm.allocate_slots(a, 12)
    assert not bm.can_allocate(b, 8)
    assert not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 4)


def test_prefix_hit_shares_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = Seq(list(range(10)))  # two full blocks + 2 tokens
    admit(bm, a)
    b = Seq(list(range(8)) + [50, 51, 52])  # same first 8 tokens, different tail
    hits = admit(bm, b)
    assert hits == a.block_table[:2] and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.num_used_blocks == 4  # 3 for a, 1 new for b
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert bm.num_used_blocks == 0


def test_prefix_match_stops_at_the_first_different_block_and_leaves_a_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, Seq(range(12)))
    assert len(bm.match_prefix(list(range(12)) + [99])) == 3
    assert len(bm.match_prefix(list(range(12)))) == 2  # the last token must be computed for its logits
    assert len(bm.match_prefix([0, 1, 2, 3, 9, 9, 9, 9, 8, 9, 10, 11, 12])) == 1  # chain: later equal blocks miss
    assert bm.match_prefix([7, 1, 2, 3, 4]) == []


def test_freed_blocks_stay_findable_until_evicted_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = Seq([1, 2, 3, 4]), Seq([5, 6, 7, 8])
    admit(bm, old)
    bm.free(old)
    admit(bm, new)
    bm.free(new)
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 4
    assert len(bm.match_prefix([1, 2, 3, 4, 0])) == 2
    # A new 2-block sequence evicts the blocks freed first (old's), keeping new's prefix findable.
    admit(bm, Seq([9, 9, 9, 9]))
    assert bm.match_prefix([1, 2, 3, 4, 0]) == []
    assert len(bm.match_prefix([5, 6, 7, 8, 0])) == 2


def test_a_cached_free_block_is_reclaimed_by_a_hit_not_counted_twice():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = Seq([1, 2, 3, 4, 5])
    admit(bm, a)
    bm.free(a)  # all 3 blocks free, 2 of them hashed
    b = Seq([1, 2, 3, 4, 6, 7])
    hits = bm.match_prefix(b.token_ids)
    assert len(hits) == 2
    assert bm.can_allocate(b, 2, hits)  # 3 blocks in all: the 2 hits plus 1 fresh
    assert not bm.can_allocate(b, 4, hits)  # 4 blocks would need one more than the pool has
    assert bm.allocate_slots(b, 2, hits)
    assert bm.num_free_blocks == 0


def test_unhashed_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=4, block_size=2)
    cached, scratch = Seq([1, 2, 3, 4]), Seq([5])
    admit(bm, cached)
    admit(bm, scratch)  # a partial block: never hashed
    bm.free(cached)
    bm.free(scratch)
    admit(bm, Seq([8, 9]))  # one fresh block: takes an unhashed one, not a cached prefix
    assert len(bm.match_prefix([1, 2, 3, 4, 0])) == 2


def test_blocks_filled_one_token_at_a_time_become_findable():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Seq([1, 2, 3])
    for token in [4, 5, 6, 7, 8, 9]:  # decoding: slots grow one token per step, blocks named once full
        assert bm.allocate_slots(seq, 1 if seq.num_computed_tokens else 3)
        seq.num_computed_tokens = len(seq.token_ids)
        bm.cache_blocks(seq)
        seq.token_ids.append(token)
    assert seq.num_hashed_blocks == 2
    assert bm.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 0]) == seq.block_table[:2]


def test_bad_pool_size_is_named():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)
