"""The paged KV cache: one pool of fixed-size blocks for all sequences, behind the model's cache protocol.

k, v: (n_layer, num_blocks, block_size, nkv, hs). Which blocks belong to which sequence is the block manager's
business; for each forward pass the engine calls `prepare` with the batch's rows -- each row's block table, how
many of its tokens are already cached (`start`) and how many new ones it feeds (`length`) -- and the model then
drives this object exactly as it drives the contiguous `KVCache` (lmforge/model.py): `positions(T)`,
`attention(T)`, `update(layer, k, v)` per layer, `advance(T)`. So the model needs no change.

Rows may feed different numbers of new tokens: they are right-padded to the longest, T. A padded query gets its
row's last real position and a mask row that sees only real keys; its output is garbage that nobody reads, and
its keys and values are never written. `update` writes the real new keys/values into their slots, then gathers
each row's blocks into a (B, nkv, S, hs) tensor, S = the longest row's block count x block_size, where the mask
hides the slots beyond each row's tokens.

The pool is slot-major (block_size before nkv): a block's slots are contiguous rows of kv_dim values, so writing
is one `index_copy_` on the flattened slot index and gathering is one indexed copy that is then only viewed as
(B, nkv, S, hs). The head-major layout (nkv before block_size) needs a second, transposing copy: on the 2 shared
cores, fp32, B=32, S=160, gathering took 7.8 ms head-major vs 3.1 ms slot-major (noisy, same process). The gather
is `index_select` over whole blocks, a row-wise memcpy: advanced indexing `pool[table]` was 10x slower (6.3 vs
0.6 ms for 32 rows x 7 blocks).

The pool's dtype may be narrower than the model's (the engine's `kv_dtype`, e.g. float16 under a float32 model):
keys and values are rounded to it when written and widened back when gathered, so attention always sees the
stored values, in this path and in the fused decode step alike. Half the bytes per token: twice the tokens in the
same memory, and half the reading for attention at many rows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.model import causal_mask


def block_table_tensor(block_tables: Sequence[Sequence[int]], device="cpu") -> torch.Tensor:
    """Rows' block tables as one (B, longest) tensor, shorter rows padded with block 0 (callers mask or never
    reach those slots), and released entries (behind a sliding window: lmforge.engine.block_manager.RELEASED)
    read as block 0 too. Built in one pass in C (numpy over the chained tables), not a padded list per row: half
    the time for the 32 rows of a decode step."""
    lengths = np.fromiter(map(len, block_tables), np.int64, len(block_tables))
    table = np.zeros((len(block_tables), int(lengths.max())), np.int64)
    table[np.arange(table.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), np.int64, int(lengths.sum())
    )
    np.maximum(table, 0, out=table)  # released entries (negative) read as block 0
    return torch.from_numpy(table).to(device)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, *, dtype=torch.float32, device="cpu"):
        shape = (config.n_layer, num_blocks, block_size, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size

    @property
    def bytes_per_block(self) -> int:
        """K and V bytes of one block over all layers."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    @property
    def bytes_per_token(self) -> int:
        """The ideal: 2 * n_layer * kv_dim * dtype bytes, as if no block were partly empty."""
        return self.bytes_per_block // self.block_size

    def prepare(
        self, block_tables: list[list[int]], starts: list[int], lengths: list[int], long_rope: list[bool] | None = None
    ) -> None:
        """Set up the next forward: row b feeds lengths[b] tokens at positions starts[b], starts[b] + 1, ...

        block_tables[b] must already hold slots for starts[b] + lengths[b] tokens. long_rope: which rows turn by
        LongRoPE's long factors (their sequences are past the original context; lmforge.rope.long_rope_rows).
        """
        device, bs = self.k.device, self.block_size
        self.long_rope = None if long_rope is None else torch.tensor(long_rope, dtype=torch.bool, device=device)
        start = torch.tensor(starts, device=device)  # (B,)
        length = torch.tensor(lengths, device=device)  # (B,)
        T = max(lengths)
        t = torch.arange(T, device=device)
        slot_pos = start[:, None] + t[None, :]  # (B, T) where each new token goes
        valid = t[None, :] < length[:, None]  # (B, T) real tokens, not padding
        self._positions = start[:, None] + torch.minimum(t[None, :], length[:, None] - 1)  # padding repeats the last

        self._table = block_table_tensor(block_tables, device)  # (B, nblk); padding is masked below
        nblk = self._table.shape[1]
        blk = self._table.gather(1, (slot_pos // bs).clamp(max=nblk - 1))  # (B, T) block of each new token
        self._write_slots = (blk * bs + slot_pos % bs)[valid]  # (N,) flat slot of each real new token
        self._valid = valid

        self._key_pos = torch.arange(nblk * bs, device=device)  # (S,) a row's slot s holds its position s
        self._masks: dict[int | None, torch.Tensor] = {}  # window -> (B, 1, T, S), made when a layer asks
        self._T = T

    # ---- the model's cache protocol ------------------------------------------------------------
    def positions(self, T: int) -> torch.Tensor:
        assert T == self._T, f"prepared for {self._T} new tokens per row, the model fed {T}"
        return self._positions  # (B, T)

    def attention(self, T: int, window: int | None = None) -> tuple[torch.Tensor, bool]:
        """Each row's causal mask over its slots, within `window` positions when a layer has a sliding window."""
        if window not in self._masks:
            mask = causal_mask(self._positions[:, :, None], self._key_pos[None, None, :], window)  # (B, T, S)
            self._masks[window] = mask[:, None]
        return self._masks[window], False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v (B, nkv, T, hs) into their slots; return each row's keys/values (B, nkv, S, hs)."""
        B, nkv, _, hs = k.shape
        S = self._table.shape[1] * self.block_size
        out = []
        for pool, new in ((self.k[layer], k), (self.v[layer], v)):  # pool: (num_blocks, bs, nkv, hs)
            written = new.transpose(1, 2)[self._valid].to(pool.dtype)  # (N, nkv, hs)
            pool.view(-1, nkv, hs).index_copy_(0, self._write_slots, written)
            rows = pool.index_select(0, self._table.view(-1)).to(k.dtype)  # (B * nblk, bs, nkv, hs), one copy
            out.append(rows.view(B, S, nkv, hs).transpose(1, 2))  # (B, nkv, S, hs)
        return out[0], out[1]

    def advance(self, T: int) -> None:
        """Nothing to do: where the next tokens go is the block manager's bookkeeping, set by `prepare`."""
