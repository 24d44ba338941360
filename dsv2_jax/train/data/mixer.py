"""Pieces of several open files interleaved in a seeded order, as a grain dataset.

Its checkpointed state is a few integers (which file each slot holds and how far into it,
the next file, the draw counter), so a restore re-reads only the open files.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from dsv2_jax.train.data.corpus import M64


def mix64(x: int) -> int:
    """A 64-bit integer hash (splitmix64 finaliser): cheap, stateless, deterministic."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


class PieceMixDataset(grain.IterDataset):
    """Pieces of `cycle` files at a time, drawn in a seeded order.

    `files` is a random-access grain MapDataset whose element i is the list of
    pieces of the i-th file in (shuffled, repeated) order; it is read lazily. The
    iterator state is a few integers: which file each slot holds and how far into
    it, the next file index and the draw counter; restoring re-reads the open files.
    """

    def __init__(
        self, files: grain.MapDataset, *, cycle: int, seed: int, what: str, epoch: int
    ):
        super().__init__(files)
        self._files = files
        self._cycle = cycle
        self._seed = seed
        self._what = what
        self._epoch = epoch  # files per epoch: a whole epoch of empty files is an error

    def __iter__(self):
        return _PieceMixIterator(self._files, self._cycle, self._seed, self._what, self._epoch)

    def __str__(self):
        return f"PieceMixDataset(cycle={self._cycle})"


class _PieceMixIterator(grain.DatasetIterator):
    def __init__(self, files: grain.MapDataset, cycle: int, seed: int, what: str, epoch: int):
        super().__init__()
        self._epoch = epoch
        self._files = files
        self._num_files = len(files)
        self._cycle = cycle
        self._seed_key = mix64(seed & M64)
        self._what = what
        self._next_file = 0
        self._draw = 0
        self._produced = 0
        self._slots = [[-1, 0] for _ in range(cycle)]  # [file index, next piece]
        self._pieces: list[list[dict] | None] = [None] * cycle

    def _fill(self) -> None:
        empty_run = 0
        for k in range(self._cycle):
            while self._slots[k][0] < 0 and self._next_file < self._num_files:
                i = self._next_file
                self._next_file += 1
                pieces = self._files[i]
                if pieces:
                    self._slots[k] = [i, 0]
                    self._pieces[k] = pieces
                    empty_run = 0
                else:
                    # Each epoch is every file once, so a corpus with any document has at
                    # most 2 * epoch - 2 empty files in a row (the end of one epoch and the
                    # start of the next); 2 * epoch - 1 in a row holds a whole empty epoch.
                    empty_run += 1
                    if empty_run >= 2 * self._epoch - 1:
                        raise ValueError(f"{self._what}: no documents with 2 or more tokens")

    def __next__(self) -> dict[str, np.ndarray]:
        self._fill()
        active = [k for k in range(self._cycle) if self._slots[k][0] >= 0]
        if not active:
            if self._produced == 0:
                raise ValueError(f"{self._what}: no documents with 2 or more tokens")
            raise StopIteration
        k = active[mix64(self._seed_key ^ self._draw) % len(active)]
        self._draw += 1
        slot = self._slots[k]
        pieces = self._pieces[k]
        piece = pieces[slot[1]]
        slot[1] += 1
        if slot[1] >= len(pieces):
            self._slots[k] = [-1, 0]
            self._pieces[k] = None
        self._produced += 1
        return piece

    def get_state(self) -> dict[str, Any]:
        return {
            "next_file": self._next_file,
            "draw": self._draw,
            "produced": self._produced,
            "slots": [list(s) for s in self._slots],
        }

    def set_state(self, state: dict[str, Any]) -> None:
        slots = [[int(i), int(o)] for i, o in state["slots"]]
        if len(slots) != self._cycle:
            raise ValueError(
                f"data iterator state has {len(slots)} slots, this pipeline has {self._cycle}"
            )
        self._next_file = int(state["next_file"])
        self._draw = int(state["draw"])
        self._produced = int(state["produced"])
        self._slots = slots
        self._pieces = [self._files[i] if i >= 0 else None for i, _ in slots]

    def __str__(self):
        return "_PieceMixIterator"
