"""The block manager: which slots of the paged KV pool each sequence owns, with prefix caching.

The KV pool is cut into `num_blocks` blocks of `block_size` token slots. A sequence holds a block table (the
ids of its blocks, in order), so its memory follows the tokens it actually has, not max length x batch.

Prefix caching (as nano-vllm's block_manager.py and vLLM's KVCacheManager): once a block is full and computed,
it is named by the hash of (parent block's hash, its token ids), a hash chain, so equal names mean equal
prefixes. A new request first looks up its prompt's full blocks by that chain and reuses every hit, taking a
reference instead of recomputing. Blocks are reference-counted; a freed block that has a hash stays in the free
pool, still findable, until it is evicted (least recently freed first) to make room for new tokens.

Sliding windows: when every layer of the model attends through a window (Mistral), keys older than the window
are never read again, so `release_before` gives their blocks back while the sequence runs; its table keeps the
entry as RELEASED (the paged cache and the fused step read those slots as block 0, behind the window's mask), so
a sequence holds about window / block_size + 2 blocks however long it grows.

Pure Python, no torch: the block manager moves integers, the paged cache (paged_cache.py) moves tensors.
Sequences are any objects with `token_ids`, `block_table`, `num_computed_tokens` and `num_hashed_blocks`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

RELEASED = -1  # a block table entry whose block went back to the pool: its slots are behind every layer's window


class Block:
    """One block of the pool: its reference count and, once full and computed, its hash and tokens."""

    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Allocates, shares and frees the blocks of a KV pool; the scheduler's only view of KV memory."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"the KV pool needs num_blocks >= 1 and block_size >= 1, got num_blocks={num_blocks}, "
                f"block_size={block_size}"
            )
        self.num_blocks, self.block_size = num_blocks, block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}  # hash of a full computed block -> its block id
        # Blocks with ref_count 0, in eviction order: the first is reused first. Unhashed blocks go to the front
        # (nothing to lose), freed hashed blocks to the back (least recently freed evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    # ---- counting ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation may take, including cached blocks it would evict."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one live sequence."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return sum(1 for b in self._free if self.blocks[b].hash is not None)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots(seq, num_new_tokens, computed_blocks)` would succeed."""
        return self._new_blocks(seq, num_new_tokens, computed_blocks) <= self._available(computed_blocks)

    # ---- prefix cache --------------------------------------------------------------------------
    @staticmethod
    def root(salt: Hashable | None) -> int | None:
        """The parent of a sequence's first block: none, or its salt's hash (its keys computed another way:
        LongRoPE's long factors, a LoRA adapter's products; `Sequence.prefix_salt`)."""
        return None if salt is None else hash(salt)

    @staticmethod
    def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
        return hash((parent, token_ids))

    def match_prefix(self, token_ids: Sequence[int], salt: Hashable | None = None) -> list[int]:
        """Block ids of the longest cached prefix of `token_ids` (computed under `salt`), in full blocks.

        At least one token is always left uncovered: its logits are what the next step samples from. `salt`
        starts the hash chain: blocks computed another way (LongRoPE's long factors, an adapter) are other blocks.
        """
        bs, parent, hits = self.block_size, self.root(salt), []
        for i in range((len(token_ids) - 1) // bs):
            chunk = tuple(token_ids[i * bs : (i + 1) * bs])
            parent = self.chain_hash(parent, chunk)
            block_id = self.hash_to_block.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            hits.append(block_id)
        return hits

    def cache_blocks(self, seq) -> None:
        """Name every block of `seq` that is now full and computed, so later requests can find it."""
        bs, table = self.block_size, seq.block_table
        for i in range(seq.num_hashed_blocks, seq.num_computed_tokens // bs):
            parent = self.blocks[table[i - 1]].hash if i else self.root(getattr(seq, "prefix_salt", None))
            chunk = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            block = self.blocks[table[i]]
            block.hash, block.token_ids = self.chain_hash(parent, chunk), chunk
            self.hash_to_block.setdefault(block.hash, block.block_id)  # a twin computed concurrently keeps the first
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, seq.num_computed_tokens // bs)

    # ---- allocate and free ---------------------------------------------------------------------
    def allocate_slots(self, seq, num_new_tokens: int, computed_blocks: Sequence[int] = ()) -> bool:
        """Grow `seq.block_table` to hold its computed tokens plus `num_new_tokens` more.

        computed_blocks: prefix-cache hits (from `match_prefix`) for a sequence with no blocks yet; they are
        shared, not copied. Returns False, changing nothing, when the pool has too few free blocks.
        """
        if computed_blocks and seq.block_table:
            raise AssertionError("prefix hits are only taken by a sequence that holds no blocks")
        new = self._new_blocks(seq, num_new_tokens, computed_blocks)
        if new > self._available(computed_blocks):
            return False
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        if computed_blocks:
            seq.block_table.extend(computed_blocks)
            seq.num_hashed_blocks = len(computed_blocks)  # hits are named already
        for _ in range(new):
            seq.block_table.append(self._take_free())
        return True

    def free(self, seq) -> None:
        """Drop `seq`'s references; blocks nobody holds return to the free pool (hashed ones stay findable)."""
        for block_id in reversed(seq.block_table):  # the tail goes first, so it is evicted before the prefix
            if block_id == RELEASED:
                continue
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def release_before(self, seq, num_tokens: int) -> int:
        """Give back the blocks of `seq` all of whose slots hold tokens before `num_tokens` (no query reads them
        again: every layer's window starts later), keeping the last hashed one, whose hash the next block's chains
        from. Their table entries become RELEASED. Returns how many blocks went back."""
        upto = min(num_tokens // self.block_size, seq.num_hashed_blocks - 1)
        released = 0
        for i in range(max(upto, 0)):
            block_id = seq.block_table[i]
            if block_id == RELEASED:
                continue
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:  # hashed (full and computed): it stays findable for other prompts
                self._free[block_id] = None
            seq.block_table[i] = RELEASED
            released += 1
        return released

    def _new_blocks(self, seq, num_new_tokens: int, computed_blocks: Sequence[int]) -> int:
        num_tokens = seq.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        return max(0, self.blocks_needed(num_tokens) - len(seq.block_table) - len(computed_blocks))

    def _available(self, computed_blocks: Sequence[int]) -> int:
        reclaimed = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)  # hits sitting in the free pool
        return len(self._free) - reclaimed

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: the prefix it held is no longer findable
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash, block.token_ids = None, None
        block.ref_count = 1
        return block_id
