"""Training strategies: how one optimiser step is taken and how its state is saved.

The loop in `ssl_zoo/train.py` knows only this interface, so a strategy that shards the optimiser (DeepSpeed
ZeRO) plugs in beside the plain one by registering in `STRATEGIES`:

- `step(micro_batches, step) -> StepResult`: forward, backward, clip, optimiser and schedule for one step;
- `save(dir)` / `load(dir)`: every rank calls them on the checkpoint directory being written / read;
- `full_state_dict()`: the method's full weights (on rank 0 at least), for export;
- `method`: the unwrapped method, for pictures and summaries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from ssl_zoo.engine import distributed as dist
from ssl_zoo.method import Method, StepOutput
from ssl_zoo.registry import STRATEGIES


@dataclasses.dataclass
class StepResult:
    loss: float
    metrics: dict[str, float]


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that have it and fp32 on CPUs, where bf16 autocast is usually slower."""
    if precision == "auto":
        fast_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if fast_bf16 else torch.float32
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"trainer.precision '{precision}' is not one of auto, fp32, bf16, fp16")
    return table[precision]


def lr_factor(step: int, trainer: DictConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr / lr, evaluated per optimiser step."""
    if step < trainer.warmup_steps:
        return (step + 1) / trainer.warmup_steps
    progress = (step - trainer.warmup_steps) / max(1, trainer.max_steps - trainer.warmup_steps)
    floor = trainer.min_lr / trainer.lr if trainer.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(method: Method, trainer: DictConfig) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups; a group may set its own betas, weight decay, `lr_scale`."""
    groups = []
    for group in method.param_groups(trainer.weight_decay):
        if not group["params"]:
            continue
        scale = group.pop("lr_scale", 1.0)
        groups.append({"betas": tuple(trainer.betas), **group, "lr": trainer.lr * scale})
    return torch.optim.AdamW(groups, lr=trainer.lr, eps=trainer.eps, weight_decay=trainer.weight_decay)


def set_activation_checkpointing(module: torch.nn.Module, enabled: bool) -> int:
    """Switch timm-style `set_grad_checkpointing` on every submodule that has it (the outermost ones); return
    how many. A model without the hook cannot recompute activations, so asking for it is an error."""
    found = [m for m in module.modules() if hasattr(m, "set_grad_checkpointing")]
    outermost = [m for m in found if not any(m is not o and m in set(o.modules()) for o in found)]
    if not outermost:
        raise ValueError("trainer.activation_checkpointing=true, but no module of this method has "
                         "set_grad_checkpointing (the timm convention); turn it off or add the hook")
    for m in outermost:
        m.set_grad_checkpointing(enabled)
    return len(outermost)


class TorchStrategy:
    """One process, or DDP across processes (gloo on CPU, nccl on GPUs)."""

    def __init__(self, cfg: DictConfig, method: Method, device: torch.device) -> None:
        self.cfg, self.trainer, self.device = cfg, cfg.trainer, device
        self.method = method.to(device)
        if self.trainer.activation_checkpointing:
            set_activation_checkpointing(self.method, True)
        self.dtype = resolve_precision(self.trainer.precision, device)
        model: torch.nn.Module = self.method
        if dist.world_size() > 1:
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=self.trainer.find_unused_parameters)
        self.model = torch.compile(model) if self.trainer.compile else model
        self.optimizer = build_optimizer(self.method, self.trainer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.trainer))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult:
        self.method.train()
        totals: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self._autocast():
                    out: StepOutput = self.model(batch, step)
                if not torch.isfinite(out.loss):
                    raise FloatingPointError(f"loss is {out.loss.item()} at step {step}: lower trainer.lr, "
                                             "check the data, or use trainer.precision=fp32")
                self.scaler.scale(out.loss / len(micro_batches)).backward()
            for key, value in {"loss": out.loss.item(), **out.metrics}.items():
                totals[key] = totals.get(key, 0.0) + float(value) / len(micro_batches)
        self.scaler.unscale_(self.optimizer)
        if self.trainer.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.trainer.grad_clip))
        totals["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return StepResult(loss=totals.pop("loss"), metrics=totals)

    def save(self, directory: Path) -> None:
        if dist.rank() == 0:
            from ssl_zoo.engine.checkpoint import torch_save

            torch_save({"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                       directory / "state.pt")

    def load(self, directory: Path) -> None:
        from ssl_zoo.engine.checkpoint import safe_load

        state = safe_load(directory / "state.pt", map_location=self.device)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.method.state_dict()


@STRATEGIES.register("single")
@STRATEGIES.register("ddp")
def build_torch_strategy(cfg: DictConfig, method: Method, device: torch.device) -> TorchStrategy:
    return TorchStrategy(cfg, method, device)


def build_strategy(cfg: DictConfig, method: Method, device: torch.device) -> Any:
    name = cfg.trainer.strategy
    if name == "auto":
        name = "ddp" if dist.world_size() > 1 else "single"
    return STRATEGIES.get(name)(cfg, method, device)
