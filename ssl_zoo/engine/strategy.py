"""Training strategies: how one optimiser step is taken and how its state is saved.

The loop in `ssl_zoo/train.py` is written against the `Strategy` protocol only, so a strategy that shards the
optimiser (DeepSpeed ZeRO) plugs in beside the plain one by registering a builder in `STRATEGIES`. The step
itself is one skeleton (`StepSkeleton`: micro-batches, metric means, the finite-loss check, the lr and
gradient-norm metrics) whose backends fill four hooks; the plain torch one is here, DeepSpeed's in
`deepspeed_strategy.py`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from ssl_zoo.engine import distributed as dist
from ssl_zoo.method import Method, StepOutput
from ssl_zoo.registry import STRATEGIES
from ssl_zoo.schema import ConfigError


@dataclasses.dataclass
class StepResult:
    """One optimiser step's outcome, as tensors on the device (reading one is a host synchronisation)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float]
    skipped: torch.Tensor  # bool: the loss or a gradient was not finite, so no parameter changed


class Strategy(Protocol):
    """What the training loop needs of a strategy.

    - `step(micro_batches, step) -> StepResult`: forward, backward, clip, optimiser and schedule for one step,
      with no host synchronisation: the loss and metrics stay tensors on the device (the loop reads them at
      log steps), and a step whose loss or gradients are not finite is skipped on the device;
    - `save(dir)` / `load(dir)`: every rank calls them on the checkpoint directory being written / read;
    - `full_state_dict()`: the method's full weights on rank 0 at least (every rank calls it: ZeRO-3 gathers);
      it changes nothing, the live method included;
    - `method`: the unwrapped method (pictures, summaries, kNN monitor);
    - `shards_parameters`: the live method holds only this rank's shard of the parameters (ZeRO-3), so work on
      the whole model at the end of a run uses a copy built from `full_state_dict()`.
    """

    method: Method
    shards_parameters: bool

    def step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


class StepSkeleton:
    """The optimiser step every backend shares; a backend fills the four hooks below."""

    trainer: DictConfig
    method: Method

    def step(self, micro_batches: list[dict[str, Any]], step: int) -> StepResult:
        self._train_mode()
        lr, outputs = self._current_lr(), []
        for i, batch in enumerate(micro_batches):
            out = self._forward_backward(batch, step, last=i == len(micro_batches) - 1, count=len(micro_batches))
            outputs.append({"loss": out.loss, **out.metrics})
        totals = detached_mean(outputs)
        norm, skipped = self._optimizer_step(torch.isfinite(totals["loss"]))
        if norm is not None and self.trainer.grad_clip > 0:
            totals["grad_norm"] = norm
        totals["lr"] = lr
        return StepResult(loss=totals.pop("loss"), metrics=totals, skipped=skipped)

    def _train_mode(self) -> None:
        self.method.train()

    def _current_lr(self) -> float | torch.Tensor:
        """The lr this step uses (of the first parameter group), read before the schedule moves on."""
        raise NotImplementedError

    def _forward_backward(self, batch: dict[str, Any], step: int, last: bool, count: int) -> StepOutput:
        """One micro-batch's forward and backward (of `count`; `last` closes the accumulation)."""
        raise NotImplementedError

    def _optimizer_step(self, finite_loss: torch.Tensor) -> tuple[torch.Tensor | float | None, torch.Tensor]:
        """Clip, step the optimiser and the schedule unless the step is bad; return (gradient norm or None,
        skipped: a bool tensor, the same on every rank)."""
        raise NotImplementedError


#: CPU flags of the instructions that make bf16 matmuls fast (Intel AMX tiles, AVX512-BF16 dot products)
FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo; torch's own checks elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    found = {"amx_bf16": torch.cpu._is_amx_tile_supported(), "avx512_bf16": torch.cpu._is_avx512_bf16_supported()}
    return {flag for flag, present in found.items() if present}


def auto_precision(device_type: str, flags: set[str], cuda_bf16: bool) -> tuple[str, str]:
    """(precision, why) for `trainer.precision=auto`: bf16 where its matmuls are fast, fp32 elsewhere."""
    if device_type == "cuda":
        return ("bf16", "this GPU supports bf16") if cuda_bf16 else ("fp32", "this GPU lacks bf16")
    fast = [flag for flag in FAST_BF16_CPU_FLAGS if flag in flags]
    if fast:
        return "bf16", f"this CPU has {' and '.join(fast)}"
    return "fp32", f"this CPU has neither {' nor '.join(FAST_BF16_CPU_FLAGS)}, so bf16 would be emulated"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of `trainer.precision`; `auto` as `auto_precision` decides for this device."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision, _ = auto_precision(device.type, cpu_flags() if device.type == "cpu" else set(), cuda_bf16)
    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"trainer.precision '{precision}' is not one of auto, fp32, bf16, fp16")
    return table[precision]


def describe_precision(precision: str, device: torch.device) -> str:
    """The line the run's log states its precision with (and why, for `auto`)."""
    if precision != "auto":
        return f"precision: {precision} (trainer.precision)"
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    chosen, why = auto_precision(device.type, cpu_flags() if device.type == "cpu" else set(), cuda_bf16)
    return f"precision: {chosen} (trainer.precision=auto: {why})"


def lr_factor(step: int, trainer: DictConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr / lr, evaluated per optimiser step."""
    if step < trainer.warmup_steps:
        return (step + 1) / trainer.warmup_steps
    progress = (step - trainer.warmup_steps) / max(1, trainer.max_steps - trainer.warmup_steps)
    floor = trainer.min_lr / trainer.lr if trainer.lr > 0 else 0.0
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(method: Method, trainer: DictConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW over the method's parameter groups; a group may set its own betas, weight decay, `lr_scale`.

    `fused`: torch's fused AdamW (one kernel over all tensors; on CPU too): faster than the per-tensor loop it
    defaults to on CPU, and it takes a device-side `found_inf` flag, which is how a bad step is skipped
    without a host synchronisation."""
    groups = []
    for group in method.param_groups(trainer.weight_decay):
        if not group["params"]:
            continue
        scale = group.pop("lr_scale", 1.0)
        groups.append({"betas": tuple(trainer.betas), **group, "lr": trainer.lr * scale})
    return torch.optim.AdamW(groups, lr=trainer.lr, eps=trainer.eps, weight_decay=trainer.weight_decay,
                             fused=fused)


def grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The gradients' total L2 norm, clipped to `max_norm` when it is positive; a tensor (no host sync)."""
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def detached_mean(values: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Per-key mean over micro-batches of tensors or numbers, detached, without reading any of them."""
    totals: dict[str, torch.Tensor] = {}
    for item in values:
        for key, value in item.items():
            value = value.detach().float() if torch.is_tensor(value) else torch.tensor(float(value))
            totals[key] = totals[key] + value if key in totals else value
    return {key: value / len(values) for key, value in totals.items()}


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


class TorchStrategy(StepSkeleton):
    """One process, or DDP across processes (gloo on CPU, nccl on GPUs)."""

    shards_parameters = False

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
                find_unused_parameters=cfg.strategy.find_unused_parameters)
        self.model = torch.compile(model) if self.trainer.compile else model
        self.optimizer = build_optimizer(self.method, self.trainer)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, self.trainer))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _forward_backward(self, batch: dict[str, Any], step: int, last: bool, count: int) -> StepOutput:
        sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
        with sync:
            with self._autocast():
                out: StepOutput = self.model(batch, step)
            self.scaler.scale(out.loss / count).backward()
        return out

    def _optimizer_step(self, finite_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.scaler.unscale_(self.optimizer)
        norm = grad_norm(self.params, self.trainer.grad_clip)
        skipped = ~(torch.isfinite(norm) & finite_loss)
        if dist.world_size() > 1:  # the losses differ by rank: every rank must skip the same steps
            skipped = skipped.to(torch.int32)
            torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX)
            skipped = skipped.bool()
        if self.scaler.is_enabled():  # fp16: the scaler skips steps with inf gradients itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:  # fused AdamW leaves every tensor (and its step count) as it was where found_inf is 1
            self.optimizer.found_inf = skipped.float()
            self.optimizer.step()
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach(), skipped

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


def _world_size_of(root: DictConfig) -> int:
    """How many processes the chosen launcher starts (local: `nprocs`; SLURM: nodes x tasks per node)."""
    launcher = root.launcher
    return int(launcher.get("nprocs", 1)) * int(launcher.get("nodes", 1)) * int(launcher.get("tasks_per_node", 1))


@dataclasses.dataclass
class SingleStrategyConfig:
    """Section `strategy` of `strategy=single`: plain torch in one process, no keys of its own."""

    name: str = "single"

    @staticmethod
    def validate(section: DictConfig, root: DictConfig) -> None:
        processes = _world_size_of(root)
        if processes > 1:
            raise ConfigError(f"strategy=single runs one process, but launcher={root.launcher.name} starts "
                              f"{processes}; choose strategy=ddp (or auto) for several processes")


@dataclasses.dataclass
class DDPStrategyConfig:
    """Section `strategy` of `strategy=ddp|auto`: plain torch, wrapped in DDP when there are several processes
    (`auto`, the default, says "by the world size"; one process runs as it is under both)."""

    name: str = "auto"
    # DDP's flag: true tolerates a step that leaves a trainable parameter without a gradient (an error under
    # false); false spares DDP a walk over the autograd graph each step when every parameter always gets one
    find_unused_parameters: bool = True


@STRATEGIES.register("single", schema=SingleStrategyConfig)
@STRATEGIES.register("auto", schema=DDPStrategyConfig)
@STRATEGIES.register("ddp", schema=DDPStrategyConfig)
def build_torch_strategy(cfg: DictConfig, method: Method, device: torch.device) -> TorchStrategy:
    return TorchStrategy(cfg, method, device)


def build_strategy(cfg: DictConfig, method: Method, device: torch.device) -> Strategy:
    """The strategy that the config's `strategy` section names."""
    return STRATEGIES.get(cfg.strategy.name)(cfg, method, device)
