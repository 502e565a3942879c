"""`strategy=deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 behind the same Strategy interface.

The DeepSpeed config is generated from the trainer section (batch size, accumulation, clipping, precision) and
the strategy section (`DeepSpeedConfig`: ZeRO stage, offload), never written by hand, so the two cannot disagree; it is saved as
`deepspeed_config.json` in the run directory. The optimiser and the lr schedule are ours (`build_optimizer`,
`lr_factor`) handed to DeepSpeed, which steps and checkpoints them. Checkpoints are DeepSpeed's own shards,
written into the directory the CheckpointManager gives (`<checkpoint>/zero/`), so the atomic `last` pointer
and auto-resume work unchanged. `full_state_dict()` gathers ZeRO-3 shards into plain fp32 tensors (and
changes nothing: the loop builds its own whole copy where it needs one); the `python -m ssl_zoo.export` tool
does the same from a checkpoint without a process group.

bf16 is DeepSpeed's `torch_autocast` mode: fp32 master weights in the module, matmuls in bf16. Unlike its
`bf16` mode it casts no module and no input, so a method's frozen parts and fp32 targets work unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ssl_zoo.engine import distributed as dist
from ssl_zoo.engine import memory_model
from ssl_zoo.engine.params import replicate_frozen_parameters
from ssl_zoo.engine.strategy import (StepSkeleton, build_optimizer, lr_factor, resolve_precision,
                                     set_activation_checkpointing)
from ssl_zoo.method import Method, StepOutput
from ssl_zoo.registry import BACKBONES, METHODS, STRATEGIES
from ssl_zoo.schema import ConfigError, checked

#: sub-directory of a checkpoint that holds DeepSpeed's files, and the tag DeepSpeed files them under
ZERO_DIR, ZERO_TAG = "zero", "state"


@dataclasses.dataclass
class DeepSpeedConfig:
    """Section `strategy` of `strategy=deepspeed`: what DeepSpeed shards and where it keeps it."""

    name: str = "deepspeed"
    # ZeRO stage 1 (optimiser states), 2 (+ gradients) or 3 (+ parameters) sharded
    zero_stage: int = checked(2, choices=(1, 2, 3))
    offload_optimizer: bool = False  # optimiser states and step in CPU memory (ZeRO-Offload)
    offload_params: bool = False  # zero_stage=3: parameters in CPU memory too

    @staticmethod
    def validate(strategy: DictConfig, root: DictConfig) -> None:
        """DeepSpeed's own limits (offload, ZeRO-3, fp16) hold for this run's trainer section."""
        cuda = root.trainer.device != "cpu" and torch.cuda.is_available()
        try:
            deepspeed_config(root.trainer, strategy, 1, "cuda" if cuda else "cpu")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def deepspeed_config(trainer: DictConfig, strategy: DictConfig, world_size: int, device_type: str) -> dict[str, Any]:
    """The DeepSpeed config implied by our trainer and strategy sections, for `world_size` processes."""
    if strategy.zero_stage not in (1, 2, 3):
        raise ValueError(f"strategy.zero_stage must be 1, 2 or 3, got {strategy.zero_stage}")
    if strategy.offload_params and strategy.zero_stage != 3:
        raise ValueError("strategy.offload_params needs strategy.zero_stage=3 (only stage 3 partitions parameters)")
    if trainer.visualize_every and strategy.zero_stage == 3:
        raise ValueError("trainer.visualize_every needs the whole model on rank 0, which ZeRO-3 gathers only at the "
                         "end of the run (the pictures are drawn then): set trainer.visualize_every=0, or use "
                         "strategy.zero_stage=2")
    dtype = resolve_precision(trainer.precision, torch.device(device_type))
    if dtype == torch.float16:
        raise ValueError("trainer.precision=fp16 is not supported with DeepSpeed here: use bf16 (no loss scaling)")
    pin = device_type == "cuda"
    zero: dict[str, Any] = {"stage": strategy.zero_stage}
    if strategy.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if strategy.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": trainer.batch_size * trainer.accumulate * world_size,
        "train_micro_batch_size_per_gpu": trainer.batch_size,
        "gradient_accumulation_steps": trainer.accumulate,
        "gradient_clipping": float(trainer.grad_clip),
        "zero_optimization": zero,
        "torch_autocast": {"enabled": dtype == torch.bfloat16, "dtype": "bfloat16"},
        "steps_per_print": 2**31 - 1,  # we log; DeepSpeed's own step prints would only duplicate it
    }


def _import_deepspeed(device: torch.device) -> Any:
    """Import DeepSpeed for this device. On CPU, pin its accelerator to cpu (the choice is cached at first
    import) and skip the shared-memory comm op, a C++ build at every init that only inference uses."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedStrategy(StepSkeleton):
    """One optimiser step per `step()` through a DeepSpeed engine; every rank calls every method."""

    def __init__(self, cfg: DictConfig, method: Method, device: torch.device) -> None:
        self.cfg, self.trainer, self.device = cfg, cfg.trainer, device
        zero = cfg.strategy
        deepspeed = _import_deepspeed(device)
        if not dist.is_initialized():  # one process: DeepSpeed would try MPI without these
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(dist.free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        if self.trainer.activation_checkpointing:
            set_activation_checkpointing(method, True)
        self.ds_config = deepspeed_config(self.trainer, zero, dist.world_size(), device.type)
        if dist.rank() == 0:
            out = Path(cfg.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2) + "\n")
        method = method.to(device)
        for param in method.parameters():  # DeepSpeed broadcasts parameters as raw bytes: that needs the
            if param.ndim and param.stride(-1) != 1:  # row-major layout, which channels_last weights lack
                param.data = param.data.clone(memory_format=torch.contiguous_format)
        if zero.zero_stage == 3:  # frozen networks stay whole on every rank (see replicate_frozen_parameters)
            replicate_frozen_parameters(method)
        if zero.offload_optimizer:  # offloaded states need DeepSpeed's CPU Adam (a C++ build)
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            torch_opt = build_optimizer(method, self.trainer)
            optimizer = DeepSpeedCPUAdam(torch_opt.param_groups, lr=self.trainer.lr, betas=tuple(self.trainer.betas),
                                         eps=self.trainer.eps, adamw_mode=True)
        else:
            optimizer = build_optimizer(method, self.trainer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, self.trainer))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=method, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.method: Method = self.engine.module
        self.shards_parameters = zero.zero_stage == 3

    def _train_mode(self) -> None:
        self.engine.train()

    def _current_lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def _forward_backward(self, batch: dict[str, Any], step: int, last: bool, count: int) -> StepOutput:
        out = self.engine(batch, step)
        self.engine.backward(out.loss)  # DeepSpeed divides by the accumulation steps itself
        self.engine.step()  # a no-op except at the accumulation boundary
        return out

    def _optimizer_step(self, finite_loss: torch.Tensor) -> tuple[float | None, torch.Tensor]:
        """The engine has stepped already (at the last micro-batch). It skips a step whose gradient norm is not
        finite, as a non-finite loss makes it (its overflow check, which reads the norm on the host: DeepSpeed's
        own synchronisation), and then holds the schedule back one step."""
        norm = self.engine.get_global_grad_norm()
        return (None if norm is None else float(norm)), torch.tensor(not self.engine.was_step_applied(),
                                                                      device=self.device)

    def save(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / ZERO_DIR), tag=ZERO_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        from ssl_zoo.engine.checkpoint import check_files, deepspeed_data_classes

        check_files(directory / ZERO_DIR, deepspeed_data_classes())  # DeepSpeed unpickles with weights_only=False
        path, _ = self.engine.load_checkpoint(str(directory / ZERO_DIR), tag=ZERO_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory / ZERO_DIR}")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank calls this (ZeRO-3 gathers collectively); full fp32 weights on every rank."""
        if not self.shards_parameters:
            return {k: v.detach().cpu().clone() for k, v in self.method.state_dict().items()}
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.method.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in self.method.state_dict().items()}


@STRATEGIES.register("deepspeed", schema=DeepSpeedConfig)
def build_deepspeed_strategy(cfg: DictConfig, method: Method, device: torch.device) -> DeepSpeedStrategy:
    return DeepSpeedStrategy(cfg, method, device)


def count_parameters(module: torch.nn.Module) -> tuple[int, int, int]:
    """(trainable, frozen, largest layer's own) parameter counts: what DeepSpeed's estimators take."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)
    return trainable, frozen, largest


def estimate_memory(cfg: DictConfig, nodes: int, gpus_per_node: int) -> dict[str, Any]:
    """Per-GPU memory of the configured run: our memory model (`ssl_zoo.engine.memory_model`: fp32 weights
    under bf16 autocast, activations, frozen networks) and, beside it, DeepSpeed's model-states estimators
    (which assume 16-bit weights). The method is built on the meta device: no memory, no GPU."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    with torch.device("meta"), warnings.catch_warnings():
        # a method that loads weights (a stage-1 tokenizer) copies them into meta parameters: a no-op that
        # torch warns about once per tensor; only the parameter counts matter here
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
        try:
            network, built = METHODS.get(cfg.method.name)(cfg), "method"
        except FileNotFoundError:  # an input of the method (a stage-1 export) is not there yet: the backbone
            network, built = BACKBONES.build(cfg.model), "backbone only"
    trainable, frozen, largest = count_parameters(network)
    trainer, strategy, gpus = cfg.trainer, cfg.strategy, max(1, gpus_per_node)
    if strategy.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable, largest, gpus, nodes, cpu_offload=strategy.offload_optimizer,
            cpu_offload_params=strategy.offload_params, zero_init=False)
    else:  # stage 1 shards the optimiser states as stage 2 does; its gradients are not, hence a lower bound
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, gpus, nodes, cpu_offload=strategy.offload_optimizer)
    bf16 = resolve_precision(trainer.precision, torch.device("cuda")) == torch.bfloat16
    frozen_forward = METHODS.get(cfg.method.name).frozen_forward_bytes(cfg, trainer.batch_size)
    zero = deepspeed_config(trainer, strategy, nodes * gpus, "cuda")["zero_optimization"]
    model = memory_model.estimate(trainable, frozen, nodes * gpus, strategy.zero_stage, cfg.model, trainer.batch_size,
                                  bf16, trainer.activation_checkpointing, strategy.offload_optimizer,
                                  strategy.offload_params, frozen_forward, zero)
    return {"counted": built, "trainable_params": trainable, "frozen_params": frozen, "largest_layer_params": largest,
            "zero_optimization": zero,
            "zero_stage": strategy.zero_stage, "gpu_gib_per_gpu": gpu / 2**30, "cpu_gib_per_node": cpu / 2**30,
            "model_gib_per_gpu": model.total / 2**30, "model_parts_gib": model.as_gib()}


def memory_fit_table(cfg: DictConfig, counts: dict[str, Any], world: int, gpu_gib: float) -> list[str]:
    """Which ZeRO stage, micro-batch and recomputation fit `gpu_gib` per GPU at the configured global batch
    (micro-batch x accumulation x `world` GPUs), by the memory model; `counts` from `estimate_memory`.
    A markdown table of per-GPU GiB, '*' where it fits."""
    trainer, strategy = cfg.trainer, cfg.strategy
    global_batch = trainer.batch_size * trainer.accumulate * world
    bf16 = resolve_precision(trainer.precision, torch.device("cuda")) == torch.bfloat16
    micro = [b for b in (4, 8, 16, 32, 64, 128, 256) if global_batch % (b * world) == 0]
    lines = ["| ZeRO | recompute | " + " | ".join(f"micro {b} (x{global_batch // (b * world)} accum.)" for b in micro)
             + " |", "|" + "---|" * (2 + len(micro))]
    for stage in (1, 2, 3):
        for recompute in (False, True):
            cells = []
            for b in micro:
                gib = memory_model.estimate(counts["trainable_params"], counts["frozen_params"], world, stage,
                                            cfg.model, b, bf16, recompute, strategy.offload_optimizer,
                                            strategy.offload_params and stage == 3,
                                            METHODS.get(cfg.method.name).frozen_forward_bytes(cfg, b),
                                            counts["zero_optimization"]).total / 2**30
                cells.append(f"{gib:.1f}{' *' if gib <= gpu_gib else ''}")
            lines.append(f"| {stage} | {'on' if recompute else 'off'} | " + " | ".join(cells) + " |")
    return lines
