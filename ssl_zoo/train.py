"""`train(cfg)`: one training run on this rank, from a validated config. Every launcher ends up here.

Set-up (device, process group, seeds, run directory), then the loop: take `accumulate` micro-batches, let the
strategy take one optimiser step, log, checkpoint. If `output_dir` holds a complete checkpoint the run resumes
from it: weights, optimiser, schedule, scaler, RNG states and data position, so it continues as an
uninterrupted run would. At the end it writes the final checkpoint, the exported weights, pictures and
`summary.json`, and returns the summary (on rank 0).
"""
from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from ssl_zoo import config as config_lib
from ssl_zoo.data.loader import close_loader, make_loader
from ssl_zoo.data.transforms import DefaultTransform
from ssl_zoo.engine import distributed as dist
from ssl_zoo.engine.checkpoint import CheckpointManager, save_safetensors
from ssl_zoo.engine.host_memory import keep_freed_memory
from ssl_zoo.engine.logger import MetricsLogger
from ssl_zoo.engine.strategy import Strategy, build_strategy, describe_precision
from ssl_zoo.evaluation.frozen import KnnMonitor
from ssl_zoo.method import Method
from ssl_zoo.registry import DATASETS, METHODS

log = logging.getLogger("ssl_zoo")


class Preempted(Exception):
    """Raised by `train` once the checkpoint asked for by `should_stop` is complete: the job may now exit and
    be requeued; a rerun resumes from exactly this step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped on request after saving the checkpoint of step {step}")
        self.step = step


def pick_device(name: str) -> torch.device:
    """The device `trainer.device` names; on the CPU, the process also keeps its freed memory for the next
    step (ssl_zoo/engine/host_memory.py)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu")
        return torch.device("cuda", dist.local_rank())
    if name == "cpu":
        keep_freed_memory()
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train(cfg: DictConfig, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Train on this rank. `should_stop` (a preemption flag, see ssl_zoo/launch/slurm.py) is polled after
    every step; once any rank sees it, all ranks save a checkpoint together and raise `Preempted`."""
    started = time.perf_counter()
    trainer = cfg.trainer
    device = pick_device(trainer.device)
    dist.init(device)
    rank, world = dist.rank(), dist.world_size()
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_lib.to_yaml(cfg))

    method_cls = METHODS.get(cfg.method.name)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    with config_lib.user_errors(f"building method {cfg.method.name}"):
        method = method_cls(cfg)
        strategy = build_strategy(cfg, method, device)
    if rank == 0:
        print(describe_precision(trainer.precision, device), flush=True)
    checkpoints = CheckpointManager(out, trainer.keep_checkpoints)
    start_step, resumed_from, carried = 0, checkpoints.latest(), {}
    if resumed_from is not None:
        with config_lib.user_errors(f"resuming from {resumed_from}"):
            strategy.load(resumed_from)
            carried = checkpoints.load_trainer_state(resumed_from)
            start_step = carried["step"]
        if rank == 0:
            print(f"resuming from {resumed_from} (step {start_step})", flush=True)
    else:
        seed_everything(cfg.seed + rank)  # different dropout / drop-path draws per rank

    with config_lib.user_errors(f"data {cfg.data.name}"):
        transform = method_cls.make_transform(cfg) or DefaultTransform(cfg.data.image_size)
        dataset = DATASETS.build(cfg.data, transform, cfg.seed)
        batches = make_loader(dataset, trainer.batch_size, cfg.data.num_workers, cfg.seed, rank, world,
                              start=start_step * trainer.accumulate, pin_memory=device.type == "cuda")
    logger = MetricsLogger(out, start_step, trainer.max_steps, enabled=rank == 0, progress=trainer.progress)
    counts = RunCounts(device, carried)
    monitor = KnnMonitor(cfg, method_cls) if trainer.eval_every and rank == 0 else None
    try:
        last_batch = _loop(cfg, strategy, batches, checkpoints, logger, counts, start_step, device, should_stop,
                           monitor)
        summary = _finish(cfg, strategy, checkpoints, logger, counts, last_batch, started, resumed_from, device)
    finally:
        close_loader(batches)
        logger.close()
        dist.shutdown()
    return summary


class TooManyBadSteps(RuntimeError):
    """`trainer.max_bad_steps` steps in a row had a non-finite loss or gradient: the run stops, keeping its
    last checkpoint (skipped steps change no weight, so every checkpoint holds finite weights)."""


class RunCounts:
    """What the loop counts on the device between log steps, so that counting is no host synchronisation:
    images the data pipeline skipped (this rank's, since this process started), steps skipped for a non-finite
    loss or gradient, the current and the longest run of those. `read()` adds what the checkpoint carried to
    the images summed over ranks (a collective, at log and checkpoint steps only)."""

    def __init__(self, device: torch.device, carried: dict[str, Any]) -> None:
        self.carried_images = int(carried.get("skipped_images", 0))
        self.images = torch.zeros((), dtype=torch.int64, device=device)
        self.steps = torch.tensor(int(carried.get("skipped_steps", 0)), device=device)
        self.in_a_row = torch.tensor(int(carried.get("bad_steps_in_a_row", 0)), device=device)
        self.longest = self.in_a_row.clone()

    def add(self, skipped_images: torch.Tensor, skipped_step: torch.Tensor) -> None:
        self.images += skipped_images.to(self.images.device)
        bad = skipped_step.to(torch.int64)
        self.steps += bad
        self.in_a_row = (self.in_a_row + 1) * bad
        torch.maximum(self.longest, self.in_a_row, out=self.longest)

    def read(self) -> dict[str, int]:
        images = dist.sum_over_ranks(self.images)
        images, steps, in_a_row, longest = torch.stack([images, self.steps, self.in_a_row, self.longest]).tolist()
        return {"skipped_images": self.carried_images + images, "skipped_steps": steps,
                "bad_steps_in_a_row": in_a_row, "longest_bad_run": longest}


def _trainer_state(done: int, trainer: DictConfig, totals: dict[str, int]) -> dict[str, int]:
    """What a checkpoint carries besides the strategy's state: the position and the run's counts."""
    return {"step": done, "micro_batches": done * trainer.accumulate,
            **{k: totals[k] for k in ("skipped_images", "skipped_steps", "bad_steps_in_a_row")}}


def _loop(cfg: DictConfig, strategy: Strategy, batches: Iterator[dict[str, Any]], checkpoints: CheckpointManager,
          logger: MetricsLogger, counts: RunCounts, start_step: int, device: torch.device,
          should_stop: Callable[[], bool] | None, monitor: Callable[[Any], dict[str, float]] | None = None
          ) -> dict[str, Any] | None:
    """The steps. Nothing here reads a device value between log and checkpoint steps (the strategy's step
    neither), so a GPU's queue never drains; a run of bad steps is noticed at the next of those steps."""
    trainer = cfg.trainer
    images_per_step = trainer.batch_size * trainer.accumulate * dist.world_size()
    last_batch, tick, ticked_at = None, time.perf_counter(), start_step
    for step in range(start_step, trainer.max_steps):
        micro = [to_device(next(batches), device) for _ in range(trainer.accumulate)]
        skipped_images = torch.stack([b.pop("skipped_images").sum() for b in micro]).sum()
        if step == 0:
            strategy.method.on_train_start(micro[0])
        result = strategy.step(micro, step)
        counts.add(skipped_images, result.skipped)
        last_batch = micro[-1]
        done = step + 1
        logger.progress(done)
        log_now = done % trainer.log_every == 0 or done == trainer.max_steps
        periodic = done % trainer.checkpoint_every == 0
        if log_now or periodic:
            totals = counts.read()
            if log_now:
                values = dist.mean_over_ranks({"loss": result.loss, **result.metrics}, device)
                values.update({k: totals[k] for k in ("skipped_images", "skipped_steps") if totals[k]})
                now = time.perf_counter()
                images_per_s = images_per_step * (done - ticked_at) / max(now - tick, 1e-9)
                tick, ticked_at = now, done
                logger.log(done, {**values, "images_per_s": images_per_s})
            if totals["longest_bad_run"] >= trainer.max_bad_steps:
                last = checkpoints.latest()
                raise TooManyBadSteps(
                    f"{totals['longest_bad_run']} steps in a row had a non-finite loss or gradient (skipped; "
                    f"{totals['skipped_steps']} in all, trainer.max_bad_steps={trainer.max_bad_steps}): stopped at "
                    f"step {done}, keeping the last checkpoint ({last or 'none yet'}); lower trainer.lr, check the "
                    "data, or use trainer.precision=fp32")
        if monitor is not None and done % trainer.eval_every == 0:  # rank 0; the others wait at the next sync
            logger.log(done, monitor(strategy.method))
        if trainer.visualize_every and done % trainer.visualize_every == 0 and dist.rank() == 0:
            strategy.method.visualize(last_batch, Path(cfg.output_dir) / "pictures")
        if periodic and done != trainer.max_steps:
            checkpoints.save(done, strategy.save, _trainer_state(done, trainer, totals))
        if should_stop is not None and done != trainer.max_steps and _stop_now(should_stop, log_now or periodic, device):
            if not periodic:
                checkpoints.save(done, strategy.save, _trainer_state(done, trainer, counts.read()))
            raise Preempted(done)
    return last_batch


def _stop_now(should_stop: Callable[[], bool], log_or_checkpoint_step: bool, device: torch.device) -> bool:
    """Whether to stop after this step. One process polls its flag every step (a host flag: no device read).
    Ranks may see a signal at different steps, so several agree through an all-reduce of their flags, which
    reads the device: they do so at log and checkpoint steps only, so a stop waits up to `log_every` steps."""
    if dist.world_size() == 1:
        return should_stop()
    return log_or_checkpoint_step and dist.mean_over_ranks({"stop": float(should_stop())}, device)["stop"] > 0


def _finish(cfg: DictConfig, strategy: Strategy, checkpoints: CheckpointManager, logger: MetricsLogger,
            counts: RunCounts, last_batch: dict[str, Any] | None, started: float, resumed_from: Path | None,
            device: torch.device) -> dict[str, Any]:
    trainer, out = cfg.trainer, Path(cfg.output_dir)
    final = checkpoints.latest()
    if final is None or final.name != f"step-{trainer.max_steps:08d}":
        final = checkpoints.save(trainer.max_steps, strategy.save,
                                 _trainer_state(trainer.max_steps, trainer, counts.read()))
    # read on the live method: a copy built from the weights (sharded parameters) lacks the run's last metrics
    trained_summary = strategy.method.summary() if dist.rank() == 0 else {}
    weights = strategy.full_state_dict()
    if dist.rank() != 0:
        return {}
    method = _whole_method(cfg, strategy, weights, device)
    save_safetensors(weights, out / "export" / "method.safetensors", {"method": cfg.method.name})
    save_safetensors(method.backbone_state_dict(), out / "export" / "backbone.safetensors",
                     {"method": cfg.method.name})
    heldout = method.evaluate()
    if heldout:
        logger.log(trainer.max_steps, heldout)
    pictures = method.visualize(last_batch, out / "pictures") if last_batch is not None else []
    summary = {
        "method": cfg.method.name,
        "steps": trainer.max_steps,
        "final_loss": logger.last.get("loss"),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "output_dir": str(out),
        "checkpoint": str(final),
        "export": str(out / "export"),
        "pictures": [str(p) for p in pictures],
        **{k: round(v, 4) for k, v in heldout.items()},
        **trained_summary,
        **method.summary(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _whole_method(cfg: DictConfig, strategy: Strategy, weights: dict[str, torch.Tensor], device: torch.device
                  ) -> Method:
    """The trained method with every weight on this rank, for export, held-out figures and pictures: the live
    one, or where it holds only a shard of the parameters (ZeRO-3) a plain copy loaded with `weights`."""
    if not strategy.shards_parameters:
        return strategy.method
    plain = METHODS.get(cfg.method.name)(cfg)
    plain.load_state_dict(weights)
    return plain.to(device)
