"""Running top-k per channel, on the device, in O(channels * k) memory.

For each image and channel the original toolbox kept the spatial maximum and its position, one
entry per image per channel (find_max_acts.py), inserting into a sorted list in a Python loop over
channels. Here a batch is reduced in one call per layer (max over the flattened map, first position
on ties) and merged into the running (channels, k) arrays by one sort.

Entries are ordered by value, then by image id (smaller first), a total order: the top k of a set
does not depend on how it was split into batches or in what order partial results are merged,
which is what makes a resumed run and the Ray engine give the same result, bit for bit, as one
uninterrupted local run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Image id of an empty slot (fewer than k images seen); sorts after every real id.
EMPTY = np.iinfo(np.int64).max


def batch_top(act: torch.Tensor, ids: torch.Tensor, ok: torch.Tensor, k: int, largest: bool = True):
    """One batch of a layer -> its own k best entries per channel: (values (C, k'), ids (C, k'),
    positions (C, k', 2)), k' = min(k, B). act is (B, C, H, W) or (B, C); a spatial map counts
    with its max (or min) and the (y, x) of the first such value in row-major order. Images with
    ok False get no entry.

    The top k of (state + batch) is the top k of (state + the batch's top k), so merging these
    gives the same result; and positions are needed only for the entries kept, so the maps are
    reduced in place (amax, no copy of a channels-last tensor) and only k maps per channel are
    searched for the position."""
    b = act.shape[0]
    spatial = act.dim() == 4 and act.shape[2] * act.shape[3] > 1
    if spatial:
        vals = act.amax(dim=(2, 3)) if largest else act.amin(dim=(2, 3))
    else:
        vals = act.reshape(b, -1)
    vals = vals.float()
    if not largest:
        vals = -vals  # the k smallest are the k largest of -v; negation is exact
    vals = torch.nan_to_num(vals, nan=-torch.inf)
    bad = ~ok.cpu()
    idv = ids.to(vals.device).view(-1, 1).expand_as(vals).clone()
    if bool(bad.any()):
        bad = bad.to(vals.device).view(-1, 1)
        vals = vals.masked_fill(bad, -torch.inf)
        idv = idv.masked_fill(bad, EMPTY)
    order = best_order(vals.t(), idv.t(), min(k, b))  # (C, k'): which image of the batch, per channel
    v, i, j = vals.t().gather(1, order), idv.t().gather(1, order), order
    pos = torch.zeros(*v.shape, 2, dtype=torch.int32, device=v.device)
    if spatial:
        channels = torch.arange(v.shape[0], device=v.device).view(-1, 1).expand_as(j)
        maps = act[j.reshape(-1), channels.reshape(-1)].reshape(j.numel(), -1)
        flat = (maps.argmax(dim=1) if largest else maps.argmin(dim=1)).view(j.shape)
        width = act.shape[-1]
        pos = torch.stack([flat // width, flat % width], dim=-1).to(torch.int32)
    return v, i, pos


def best_order(vals: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices of the k best entries of each row, in order: value descending, then id
    ascending (a total order: ids are unique within a row, one entry per image)."""
    by_id = torch.argsort(ids, dim=1)
    _, order = torch.sort(vals.gather(1, by_id), dim=1, descending=True, stable=True)
    return by_id.gather(1, order[:, :k])


def select(vals: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor, k: int):
    """The k best entries of each row (best_order), with their positions."""
    order = best_order(vals, ids, k)
    return vals.gather(1, order), ids.gather(1, order), pos.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))


@dataclass
class TopK:
    """The k best entries per channel so far. values are stored negated for a bottom-k (so the
    same merge serves both); ``result()`` gives the real values."""
    values: torch.Tensor     # (C, k) float32
    ids: torch.Tensor        # (C, k) int64, EMPTY where unfilled
    positions: torch.Tensor  # (C, k, 2) int32 (y, x)
    largest: bool = True

    @classmethod
    def empty(cls, channels: int, k: int, largest: bool = True, device="cpu") -> "TopK":
        return cls(torch.full((channels, k), -torch.inf, device=device),
                   torch.full((channels, k), EMPTY, dtype=torch.int64, device=device),
                   torch.zeros((channels, k, 2), dtype=torch.int32, device=device), largest)

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def merged(self, vals, ids, pos) -> "TopK":
        """A new TopK with the candidates (C, n) merged in (self is left as it was, so a caller
        can swap all layers' states at once)."""
        v, i, p = select(torch.cat([self.values, vals.to(self.values.device)], 1),
                         torch.cat([self.ids, ids.to(self.ids.device)], 1),
                         torch.cat([self.positions, pos.to(self.positions.device)], 1), self.k)
        return TopK(v, i, p, self.largest)

    # ----- plain arrays, for checkpoints, partial results and the atlas -----------------------
    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Stored as found (negated for a bottom-k): from_arrays restores it exactly."""
        return {f"{prefix}values": self.values.cpu().numpy(), f"{prefix}ids": self.ids.cpu().numpy(),
                f"{prefix}positions": self.positions.cpu().numpy()}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "", largest: bool = True, device="cpu") -> "TopK":
        return cls(torch.from_numpy(np.array(arrays[f"{prefix}values"])).to(device),
                   torch.from_numpy(np.array(arrays[f"{prefix}ids"])).to(device),
                   torch.from_numpy(np.array(arrays[f"{prefix}positions"])).to(device), largest)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, image ids, positions) as a user reads them: real values in order (largest
        first, or smallest first for a bottom-k); ids -1 and values NaN in unfilled slots."""
        v = self.values.cpu().numpy().astype(np.float32)
        i = self.ids.cpu().numpy().copy()
        empty = i == EMPTY
        v = v if self.largest else -v
        v[empty] = np.nan
        i[empty] = -1
        return v, i, self.positions.cpu().numpy().copy()
