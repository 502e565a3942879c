"""The method contract: everything the trainer may assume about a self-supervised method.

A method is an `nn.Module` built by a factory registered in `METHODS`. All that is method-specific
(views, masking, targets, losses) happens inside `training_step`; the trainer only runs backward, the
optimiser, the schedule, logging and checkpoints. Evaluation and export use `extract_features`,
`backbone_state_dict` and `timm_spec`, so they work for every method without knowing it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig
from torch import nn


@dataclasses.dataclass
class StepOutput:
    """What `training_step` returns: the loss to minimise and scalar metrics to log beside it.

    Metrics are 0-d tensors (detached) or numbers: the trainer reads them at log steps only, since reading a
    device tensor (`.item()`, `float()`) every step would make the host wait for the device."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training run of a multi-stage method (PeCo: tokenizer, then masked image modelling).

    The stage's config is the user's command line with `method` chosen instead (None: the user's own) and
    `settings` applied over it: typed values by dotted key (`{"trainer.max_steps": 450}`), checked against the
    schemas like any override. The stage runs in `output_dir/<name>`; a later stage can point at an earlier
    one's export, which is always `<stage output_dir>/export/method.safetensors`.
    """

    name: str
    method: str | None = None
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TimmSpec:
    """How a method's backbone becomes a timm model: `timm.create_model(architecture, **model_args)` builds it
    and `backbone_state_dict()` loads into it (all but the classifier head). `mean`/`std` are the
    normalisation the backbone was trained with, `input_size` its (channels, height, width); they become the
    exported `pretrained_cfg`."""

    architecture: str
    model_args: dict[str, Any]
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Method(nn.Module):
    """Base class with the default behaviour of every optional hook. Subclasses implement the four
    abstract parts: `training_step`, `extract_features`, `backbone` and (optionally) the transform."""

    #: parameter names matching any of these substrings get no weight decay (besides 1-D params)
    no_weight_decay_keywords: tuple[str, ...] = ("pos_embed", "cls_token", "mask_token", "relative_position")

    def training_step(self, batch: Any, step: int) -> StepOutput:
        raise NotImplementedError

    def forward(self, batch: Any, step: int) -> StepOutput:
        """DDP and torch.compile wrap `forward`, so the strategies call the method through it."""
        return self.training_step(batch, step)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C) features for kNN / linear-probe evaluation."""
        raise NotImplementedError

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that downstream tasks load (fine-tuning, timm export)."""
        return self.state_dict()

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Trainable parameters split into decayed and not decayed (1-D, biases, embeddings, tokens)."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            skip = param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in self.no_weight_decay_keywords)
            (no_decay if skip else decay).append(param)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # ---- optional hooks (no-ops by default) -------------------------------------------------------
    @classmethod
    def stages(cls, cfg: DictConfig) -> list[Stage]:
        """Runs needed before/including this method's own. One stage (this run) by default."""
        return []

    @classmethod
    def timm_spec(cls, cfg: DictConfig) -> TimmSpec | None:
        """The timm model the backbone of a run with this config is (evaluation, fine-tuning, timm export);
        None: the backbone has no timm form, so only `extract_features` can evaluate it. A classmethod, so
        a random-initialised baseline or an export needs neither the method's other parts nor their files."""
        return None

    @classmethod
    def make_transform(cls, cfg: DictConfig) -> Callable[[Any, "torch.Generator"], Any] | None:
        """Per-sample transform `(PIL image, generator) -> sample`; None uses the data section's default.
        The generator is seeded per (seed, epoch, index), so views are reproducible and resumable."""
        return None

    @classmethod
    def frozen_forward_bytes(cls, cfg: DictConfig, batch_size: int) -> float:
        """Peak bytes of the no-grad forward of the method's frozen parts (a target tokenizer) on `batch_size`
        samples, for the memory model (`ssl_zoo.engine.memory_model`); 0 when there is none."""
        return 0.0

    def on_train_start(self, batch: Any) -> None:
        """Called once with the first batch, before the first step (k-means init, sanity checks)."""

    def evaluate(self) -> dict[str, float]:
        """Held-out figures at the end of a run (logged to metrics.jsonl and put in the summary). Called on
        rank 0 with the whole model, never per step; no figures by default."""
        return {}

    def visualize(self, batch: Any, out_dir: Path) -> list[Path]:
        """Write pictures (reconstructions, histograms) for this batch; return their paths."""
        return []

    def summary(self) -> dict[str, Any]:
        """Final figures for the run's summary (codebook usage, accuracy, ...)."""
        return {}
