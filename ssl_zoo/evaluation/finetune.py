"""Supervised fine-tuning as a method, so it trains through the same loop, strategies (single, DDP, DeepSpeed)
and launchers (local, SLURM) as pretraining, with the same checkpoints, resume, metrics and TensorBoard.

BEiT's recipe from timm's parts: layer-wise lr decay (`param_groups_layer_decay`), Mixup/CutMix with label
smoothing into `SoftTargetCrossEntropy`, RandAugment and random erasing (`create_transform`), drop path, the
timm model's own pooling (mean-pooled tokens into `fc_norm` for BEiT) and a head initialised x0.001. The
backbone is the `timm` model section: a timm architecture and the weights of the run being evaluated.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from omegaconf import MISSING, DictConfig
from PIL import Image

from ssl_zoo.errors import UserError
from ssl_zoo.evaluation.backbone import Backbone
from ssl_zoo.evaluation.protocols import PROTOCOLS
from ssl_zoo.method import Method, StepOutput, TimmSpec
from ssl_zoo.registry import BACKBONES, METHODS
from ssl_zoo.schema import Limits, checked

HEAD_INIT_SCALE = 0.001


@dataclasses.dataclass
class TimmModelConfig:
    """A timm model: what `python -m ssl_zoo.eval protocol=finetune` fills in from the evaluated run."""

    name: str = "timm"
    architecture: str = MISSING
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    input_size: list[int] = dataclasses.field(default_factory=lambda: [3, 224, 224])
    mean: list[float] = dataclasses.field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = dataclasses.field(default_factory=lambda: [0.229, 0.224, 0.225])
    weights: Optional[str] = None  # a safetensors file of backbone weights; None: random init


@dataclasses.dataclass
class FinetuneConfig:
    """The `protocol=finetune` section; it becomes the `method` section of the fine-tuning run."""

    name: str = "finetune"
    num_classes: int = checked(0, ge=0)  # 0: the dataset's
    layer_decay: float = checked(0.65, gt=0, le=1)
    drop_path_rate: float = checked(0.1, ge=0, lt=1)
    mixup: float = checked(0.8, ge=0)
    cutmix: float = checked(1.0, ge=0)
    label_smoothing: float = checked(0.1, ge=0, lt=1)
    auto_augment: Optional[str] = "rand-m9-mstd0.5-inc1"
    re_prob: float = checked(0.25, ge=0, le=1)
    scale: list[float] = checked(lambda: [0.08, 1.0], length=2, each=Limits(gt=0, le=1))
    eval_batch_size: int = checked(128, ge=1)


def backbone_of(section: Any) -> Backbone:
    spec = TimmSpec(section.architecture, dict(section.model_args), tuple(section.input_size),
                    tuple(section.mean), tuple(section.std))
    return Backbone(spec, Path(section.weights) if section.weights else None, section.weights or "random init")


@BACKBONES.register("timm", schema=TimmModelConfig)
def build_timm(section: Any, num_classes: int = 0, **model_kwargs: Any) -> torch.nn.Module:
    return backbone_of(section).build(num_classes, **model_kwargs)


def posterize_to_zero_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """RandAugment's increasing posterize keeps 0 bits at magnitude 10 (reached through `mstd`): a black image,
    as Pillow < 13 made it; Pillow 13 rejects 0 bits, which crashed a fine-tune at a random step."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep < 1:
        return img.point(lambda _: 0)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


class SeededTransform:
    """A timm transform (which draws from the global `random`, numpy and torch generators) made reproducible
    per sample: those generators are seeded from the sample's generator and restored afterwards."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.transform = transform

    def __call__(self, img: Image.Image, gen: torch.Generator) -> dict[str, torch.Tensor]:
        seed = int(torch.randint(0, 2**31 - 1, (), generator=gen))
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
                return {"image": self.transform(img)}
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# the protocol entry gives `protocol=finetune` its schema; ssl_zoo/evaluation/run_finetune.py runs it
@PROTOCOLS.register("finetune", schema=FinetuneConfig)
@METHODS.register("finetune", schema=FinetuneConfig)
class Finetune(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        from timm.data import Mixup
        from timm.layers import trunc_normal_
        from timm.loss import SoftTargetCrossEntropy

        section = cfg.method
        if section.num_classes < 2:
            raise UserError(f"method.num_classes={section.num_classes}: fine-tuning needs two or more classes")
        self.num_classes, self.smoothing = section.num_classes, section.label_smoothing
        self.layer_decay = section.layer_decay
        self.model = build_timm(cfg.model, section.num_classes, drop_path_rate=section.drop_path_rate)
        head = self.model.get_classifier()
        trunc_normal_(head.weight, std=0.02)
        with torch.no_grad():
            head.weight.mul_(HEAD_INIT_SCALE)
            head.bias.zero_()
        self.mixup = Mixup(mixup_alpha=section.mixup, cutmix_alpha=section.cutmix, label_smoothing=self.smoothing,
                           num_classes=self.num_classes) if section.mixup > 0 or section.cutmix > 0 else None
        self.loss = SoftTargetCrossEntropy()

    @classmethod
    def make_transform(cls, cfg: DictConfig) -> SeededTransform:
        from timm.data import create_transform

        section = cfg.method
        transform = create_transform(
            input_size=tuple(cfg.model.input_size), is_training=True, scale=tuple(section.scale),
            auto_augment=section.auto_augment, interpolation="bicubic", re_prob=section.re_prob,
            re_mode="pixel", re_count=1, mean=tuple(cfg.model.mean), std=tuple(cfg.model.std))
        for step in getattr(transform, "transforms", []):
            for op in getattr(step, "ops", []):
                if op.name.startswith("Posterize"):
                    op.aug_fn = posterize_to_zero_bits
        return SeededTransform(transform)

    @classmethod
    def timm_spec(cls, cfg: DictConfig) -> TimmSpec:
        return backbone_of(cfg.model).spec

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        from timm.data.mixup import mixup_target

        images, labels = batch["image"], batch["label"]
        if self.mixup is not None and len(images) % 2 == 0:
            images, targets = self.mixup(images, labels)
        else:
            targets = mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return StepOutput(self.loss(self.model(images), targets))

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The fine-tuned backbone without its classifier: the whole model stays in method.safetensors."""
        return {k: v for k, v in self.model.state_dict().items() if not k.startswith("head.")}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """timm's layer-wise lr decay (BEiT's): `lr_scale` = decay^(L+1-i) with the stem at layer 0, block k at
        layer k+1, the final norm and head at L+1; no weight decay on 1-D parameters, biases and the model's
        `no_weight_decay()` names (tokens, position terms, relative-position tables)."""
        from timm.optim import param_groups_layer_decay

        skip = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return param_groups_layer_decay(self.model, weight_decay, no_weight_decay_list=skip,
                                        layer_decay=self.layer_decay)
