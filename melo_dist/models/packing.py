"""Real tokens only: a task's left-padded windows [W, L] packed into T token slots.

A transformer's position-wise layers (embeddings, projections, LayerNorm, feed-forward, head)
never mix positions, so they run on the packed tokens [T, D]; only attention needs the windows,
and it runs in groups of neighbouring windows without the left padding they all share
(`melo_dist.meta.melo.window_groups`). Padding keys are hidden and positions count from the
right, so a real position's output is what the padded window gives it (the parity tests hold
the two equal); padding positions output 0.

`pack_layout` builds the index tensors for a batch of tasks [B, ...] once, outside `vmap`;
`Packing` reads one task's rows of them inside it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

Groups = list[tuple[slice, int]]  # (windows, left-padding columns they all skip)


def even_runs(size: int, parts: int) -> list[tuple[int, int]]:
    """[0, size) cut into at most `parts` runs (start, end) of near-equal length, none empty."""
    bounds = torch.linspace(0, size, parts + 1).round().int().tolist()
    return [(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def pack_layout(items: torch.Tensor, groups: Groups) -> dict[str, torch.Tensor]:
    """Index tensors of each task's packing, from its windows [B, W, L] (0 = padding):
    - `tokens` [B, T]: each packed token's slot in the flattened windows (T is the most real
      tokens of any task; a task with fewer repeats a padding slot: computed, never read);
    - `slots` [B, W, L]: each window slot's token, T (a zero row) at padding;
    - `returns` [B, T]: each token's row among the attention groups' flattened outputs."""
    real = (items > 0).flatten(1)
    count = int(real.sum(1).max())
    tokens = torch.argsort(~real, dim=1, stable=True)[:, :count]  # real slots first, in order
    slots = torch.where(real, real.cumsum(1) - 1, count).view(items.shape)
    width, device = items.shape[-1], items.device
    group_rows = torch.zeros(items.shape, dtype=torch.long, device=device)  # slot's row in group
    offset = 0
    for windows, skipped in groups:
        kept = width - skipped
        rows = torch.arange((windows.stop - windows.start) * kept, device=device).view(-1, kept)
        group_rows[:, windows, skipped:] = offset + rows
        offset += rows.numel()
    returns = group_rows.flatten(1).gather(1, tokens)
    return {"tokens": tokens, "slots": slots, "returns": returns}


@dataclass(frozen=True)
class Packing:
    """One task's packing (its rows of `pack_layout`) and the attention groups."""

    tokens: torch.Tensor  # [T]
    slots: torch.Tensor  # [W, L]
    returns: torch.Tensor  # [T]
    groups: Groups

    def pack(self, windows: torch.Tensor) -> torch.Tensor:
        """[W, L, ...] -> [T, ...]: the real tokens' entries."""
        return take_rows(windows.flatten(0, 1), self.tokens)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [W, L, ...], zeros at padding."""
        return take_rows(with_zero_row(packed), self.slots)

    def split(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """[T, C] -> each attention group's windows [Wg, Lg, C] (zeros at padding)."""
        padded = with_zero_row(packed)
        return [take_rows(padded, self.slots[group, skipped:]) for group, skipped in self.groups]

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The groups' outputs [Wg, Lg, C] -> the packed tokens' rows [T, C]."""
        return take_rows(torch.cat([out.flatten(0, 1) for out in outputs]), self.returns)


def with_zero_row(rows: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N + 1, ...]: row N is zeros (what padding slots read)."""
    return torch.cat([rows, rows.new_zeros(1, *rows.shape[1:])])


def take_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows [N, ...] and index [...] -> [..., ...]: `rows[index]` as a `gather`, whose backward
    (a scatter-add) uses both threads where advanced indexing's accumulating index_put did not.
    Item tables are read with it too: under `vmap` over per-task tables, `F.embedding`'s
    backward is several times slower, the more so the narrower the table (an item bias)."""
    flat = rows.reshape(len(rows), -1)
    taken = flat.gather(0, index.reshape(-1, 1).expand(-1, flat.shape[1]))
    return taken.view(*index.shape, *rows.shape[1:])
