"""The KV store: the cache of one or more sequences (rows) in the backend's decoding memory.

Regions, allocated once (``memory.alloc``; host arrays, or device memory on TensorRT)::

    keys, values   (layers, batch, max_positions, width)   every layer's keys and values by row
    masks          (stages, batch, max_positions)          per stage, which rows of its past are filled
    hidden         (stages - 1, batch, max_positions, width)  stage outputs kept for recomputation

and per row, on the host: ``lengths[row]`` (cache rows in use; a new token's keys and values go to row
``lengths[row]``) and ``positions[row]`` (the position id that row takes: equal to the length for a
sequence that starts at position 0, as every one does today). A stage's mask says which rows its
layers hold: with state propagation every stage is complete and all agree; with recomputation a
stage's rows wait for a deep token, so a deeper stage's mask may end earlier.

Each row is independent (llama.cpp's sequence ids): a step runner binds one row, so rows of one store
decode separate sequences, and more rows are more sequences of the same code. The store moves data
only through the memory's ``write``/``read``; every change of a row is one call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runtimes.errors import ConfigError, InputError

__all__ = ["KVStore", "ALL_STAGES"]

ALL_STAGES = slice(None)


class KVStore:
    """The cache of ``batch`` rows of up to ``max_positions`` positions each (see the module)."""

    def __init__(self, memory: Any, layers: int, batch: int, max_positions: int, width: int, stages: int) -> None:
        for name, v in (("layers", layers), ("batch", batch), ("max_positions", max_positions), ("width", width),
                        ("stages", stages)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"a KV store needs a positive integer {name}, got {v!r}")
        self.memory, self.batch, self.capacity, self.stages = memory, batch, max_positions, stages
        self.keys = memory.alloc((layers, batch, max_positions, width), np.float32)
        self.values = memory.alloc((layers, batch, max_positions, width), np.float32)
        self.masks = memory.alloc((stages, batch, max_positions), np.int64)
        self.hidden = memory.alloc((max(1, stages - 1), batch, max_positions, width), np.float32)
        self.lengths = [0] * batch
        self.positions = [0] * batch

    def _row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < self.batch:
            raise ConfigError(f"row {row!r} is not one of the store's {self.batch} rows")
        return row

    def _room(self, row: int, length: int) -> None:
        if not 0 <= length <= self.capacity:
            raise InputError(f"row {row}: {length} positions exceed the model's {self.capacity}")

    def reset(self, row: int, length: int, position: int | None = None) -> None:
        """Row ``row`` holds positions [0, length) in every stage (what is in them is the caller's)."""
        self._room(self._row(row), length)
        write = self.memory.write
        write(self.masks[:, row], 0)
        write(self.masks[:, row, :length], 1)
        self.lengths[row] = length
        self.positions[row] = length if position is None else position

    def advance(self, row: int, n: int = 1, stages: slice | None = ALL_STAGES) -> None:
        """The row's next ``n`` cache rows are part of its sequence now; ``stages``: whose masks show them
        (every stage's by default; None when the caller has set the masks stage by stage)."""
        at = self.lengths[row]
        if at + n > self.capacity:
            raise InputError(f"row {row}: {at + n} positions exceed the model's {self.capacity}")
        if stages is not None:
            self.memory.write(self.masks[stages, row, at:at + n], 1)
        self.lengths[row] = at + n
        self.positions[row] += n

    def mark(self, row: int, stages: int | slice, lo: int, hi: int) -> None:
        """Rows [lo, hi) of ``stages``' pasts are filled (the keys and values are in the cache)."""
        if not 0 <= lo <= hi <= self.capacity:
            raise InputError(f"row {row}: rows [{lo}, {hi}) are outside the model's {self.capacity} positions")
        self.memory.write(self.masks[stages, row, lo:hi], 1)

    def rewind(self, row: int, length: int) -> None:
        """Drop the row's positions from ``length`` on, in every stage (rejected drafts)."""
        self._row(row)
        old = self.lengths[row]
        if not 0 <= length <= old:
            raise ConfigError(f"row {row}: cannot rewind to {length}, it holds {old} positions")
        self.memory.write(self.masks[:, row, length:old], 0)
        self.lengths[row] = length
        self.positions[row] -= old - length

    def snapshot(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """The row's keys and values, (layers, 1, length, width) each, as host arrays."""
        n = self.lengths[self._row(row)]
        keys, values = self.memory.read(self.keys[:, row:row + 1, :n], self.values[:, row:row + 1, :n])
        return np.array(keys), np.array(values)

    def restore(self, row: int, keys: np.ndarray, values: np.ndarray) -> None:
        """The row as ``snapshot`` saw it: its keys and values, and every stage's mask over them."""
        n = keys.shape[2]
        self._room(self._row(row), n)
        self.memory.write(self.keys[:, row:row + 1, :n], keys)
        self.memory.write(self.values[:, row:row + 1, :n], values)
        self.reset(row, n)
