"""A resumable, rank-sharded batch sampler and the data loader built on it.

The data position is one number: how many micro-batches the run has consumed. From it the sampler knows the
epoch and the offset in that epoch's permutation (seeded by (seed, epoch)), so a resumed run continues with
exactly the batches an uninterrupted one would have seen, and no data is loaded to skip ahead.
"""
from __future__ import annotations

import signal
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_zoo.launch.local import STOP_SIGNALS


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's share of each global batch as `(epoch, index)` keys, forever, from `start`."""

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        global_batch = batch_size * world_size
        if length < global_batch:
            raise ValueError(f"the dataset has {length} samples, fewer than one global batch of {global_batch} "
                             "(trainer.batch_size x processes): lower trainer.batch_size or use more data")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.batches_per_epoch = length // global_batch

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            batch_epoch, offset = divmod(position, self.batches_per_epoch)
            if batch_epoch != epoch:
                epoch, order = batch_epoch, self._permutation(batch_epoch)
            first = (offset * self.world_size + self.rank) * self.batch_size
            yield [(epoch, int(i)) for i in order[first:first + self.batch_size]]
            position += 1

    def __len__(self) -> int:  # an endless sampler; DataLoader only needs this for its warnings
        return 2**62


def ignore_stop_signals(worker_id: int) -> None:
    """A loading worker leaves the stop signals to the main process. `scancel`, `kill -- -PGID` and `docker stop`
    signal every process of the job: a worker that died of it would fail the step the main process finishes
    before it saves its checkpoint. So the main process must end them itself: `close_loader`, on every way out
    of training (multiprocessing's own exit hook would SIGTERM them and then wait forever)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int, world_size: int,
                start: int, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    sampler = ResumableBatchSampler(len(dataset), batch_size, seed, rank, world_size, start)
    # its own generator: creating the iterator must not draw from the global RNG that the model's dropout
    # uses, or a resumed run (which creates it at another point of that RNG's sequence) would diverge
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None,
                        generator=torch.Generator().manual_seed(seed + rank),
                        worker_init_fn=ignore_stop_signals if num_workers > 0 else None)
    return iter(loader)


def close_loader(batches: Iterator[dict[str, Any]]) -> None:
    """Stop the loading workers of a `make_loader` iterator now (they ignore SIGTERM); no-op without workers."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
