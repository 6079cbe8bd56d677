"""Deterministic, multi-host sharded, resumable batches of records.

Epoch e visits the records in ``permutation(seed, e)`` order (or file order with
``shuffle=False``, which is what the reference trains with: verl ``data.shuffle=False``).  The
epoch order is cut to a multiple of the global batch (``batch_size × process_count``) when
``drop_last``; in each global batch, process p takes the p-th contiguous block of
``batch_size`` records.  So the shards are disjoint, together cover the (cut) epoch, every
process yields the same number of batches (which multi-host training needs), and the processes'
batches concatenated in process order are exactly the batch a single process with
``batch_size × process_count`` would see: a run's global batch does not depend on how many
hosts it runs on.  ``batch_size`` is per process.

The position is two plain ints, ``{"epoch", "batch"}`` (batches already yielded in the epoch);
``set_state`` on a fresh iterator built with the same arguments resumes at the same record.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rlcsd_jax.data.records import Record


def _default_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when the caller did not say: keeps the data layer free of JAX otherwise

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return int(process_index), int(process_count)


class BatchIterator:
    """Iterates over lists of ``batch_size`` records; infinite unless ``num_epochs`` is set."""

    def __init__(
        self,
        records: Sequence[Record],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = False,
        drop_last: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.process_index, self.process_count = _default_process(process_index, process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index {self.process_index} is not in "
                f"[0, process_count={self.process_count})"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        global_batch = batch_size * self.process_count
        if drop_last and len(records) < global_batch:
            raise ValueError(
                f"{len(records)} records cannot fill one global batch of {global_batch} "
                f"({batch_size} per process × {self.process_count} processes)"
            )
        self.records = records
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_epochs = num_epochs
        self._epoch = 0
        self._batch = 0
        self._shard_cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Global record order of an epoch, before sharding and cutting."""
        n = len(self.records)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def shard_indices(self, epoch: int) -> np.ndarray:
        """Record indices this process visits in ``epoch``, in order."""
        if self._shard_cache is not None and self._shard_cache[0] == epoch:
            return self._shard_cache[1]
        order = self.epoch_order(epoch)
        global_batch = self.batch_size * self.process_count
        full = len(order) // global_batch * global_batch
        blocks = order[:full].reshape(-1, self.process_count, self.batch_size)
        shard = blocks[:, self.process_index].reshape(-1)
        if not self.drop_last:  # the partial last global batch, cut the same way
            tail = order[full:]
            lo = self.process_index * self.batch_size
            shard = np.concatenate([shard, tail[lo:lo + self.batch_size]])
        self._shard_cache = (epoch, shard)
        return shard

    def batches_per_epoch(self) -> int:
        n = len(self.shard_indices(self._epoch))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> list[Record]:
        while True:
            if self.num_epochs is not None and self._epoch >= self.num_epochs:
                raise StopIteration
            shard = self.shard_indices(self._epoch)
            start = self._batch * self.batch_size
            if start < len(shard) and (not self.drop_last or start + self.batch_size <= len(shard)):
                self._batch += 1
                return [self.records[int(i)] for i in shard[start : start + self.batch_size]]
            if len(shard) == 0:
                raise StopIteration  # nothing for this process at all: avoid an endless loop
            self._epoch += 1
            self._batch = 0

    def get_state(self) -> dict[str, int]:
        """The position as plain ints (JSON / checkpoint friendly)."""
        return {"epoch": int(self._epoch), "batch": int(self._batch)}

    def set_state(self, state: dict) -> None:
        """Restores a position from ``get_state``; the next batch is the one that would have come."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"iterator state must be {{'epoch': int, 'batch': int}}, got {state!r}"
            ) from exc
        if epoch < 0 or batch < 0:
            raise ValueError(f"iterator state has negative values: {state!r}")
        self._epoch, self._batch = epoch, batch
