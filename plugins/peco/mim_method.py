"""Stage 2, `method=peco`: BEiT-style masked image modelling with the perceptual codebook as the target.

Per sample: one crop gives the ViT view and the tokenizer view, plus a block mask. The frozen tokenizer maps
its view to code indices; the ViT sees its view with the masked patches replaced by the mask token; a linear
head over the vocabulary predicts the codes of the masked patches only, trained with cross-entropy through
the fused `ssl_zoo_kernels.masked_linear_cross_entropy`. With `method.soft_target_temperature` the target of
each masked patch is instead a distribution over the codebook (see `VQTokenizer.soft_tokenize`), trained with a
soft cross-entropy on the masked rows' logits.

Without `method.tokenizer.checkpoint`, `stages()` makes the run two-stage: first `method=peco_tokenizer`
(trained with `method.tokenizer_training.*` as its trainer settings), then this method on its export.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import ssl_zoo_kernels
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from timm.layers import trunc_normal_
from torch import nn

from ssl_zoo.method import Method, Stage, StepOutput, TimmSpec
from ssl_zoo.registry import BACKBONES, METHODS

from .beit import beit_timm_spec
from .checkpoints import load_strict, tokenizer_state
from .config import PecoConfig, tokenizer_image_size
from .masking import BlockMaskGenerator
from .transforms import MimTransform
from .vqgan import VQTokenizer

class MimHead(nn.Module):
    """Linear head over the vocabulary fused with the masked cross-entropy (no full logits).

    A module whose forward takes the weights, rather than a call on `head.weight` from outside: ZeRO-3 gathers
    a module's partitioned parameters only around that module's own forward and backward.

    Every mask has exactly `num_masked` patches (see masking.py), so the masked rows are gathered by a sort of
    the mask rather than by boolean indexing, whose output size the host would have to wait for."""

    def __init__(self, width: int, vocab_size: int, kernel_impl: str, num_masked: int) -> None:
        super().__init__()
        self.num_masked = num_masked
        self.weight = nn.Parameter(torch.empty(vocab_size, width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        trunc_normal_(self.weight, std=0.02)
        self.kernel_impl = kernel_impl

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def masked_rows(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) boolean mask -> (B, num_masked) indices of its masked patches, in order."""
        return mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :self.num_masked]

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor,
                label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, M, C) tokens of the masked patches and their targets -> (loss, accuracy). Targets: (B, M) codes (in
        range: the tokenizer's), or (B, M, vocab) distributions (soft targets; accuracy against their modes)."""
        if targets.dim() == 3:
            log_probs = F.linear(hidden, self.weight, self.bias).float().log_softmax(dim=-1)
            loss = -(targets * log_probs).sum(-1).mean()
            return loss, (log_probs.argmax(-1) == targets.argmax(-1)).float().mean()
        return ssl_zoo_kernels.masked_linear_cross_entropy(
            hidden, self.weight, self.bias, targets, ignore_index=None,
            label_smoothing=label_smoothing, impl=self.kernel_impl, return_accuracy=True)


@METHODS.register("peco", schema=PecoConfig)
class Peco(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        section = cfg.method
        self.label_smoothing = section.label_smoothing
        self.soft_target_temperature = section.soft_target_temperature
        self.backbone = BACKBONES.build(cfg.model)
        path = section.tokenizer.checkpoint
        if path is None:
            raise ValueError("method=peco needs a trained tokenizer: set method.tokenizer.checkpoint=PATH "
                             "(a stage-1 run's folder or its export/method.safetensors), or run "
                             "`python -m ssl_zoo.run method=peco` without it to train one first")
        image_size = tokenizer_image_size(cfg)
        self.tokenizer = VQTokenizer(section.tokenizer, image_size, section.kernel_impl)
        load_strict(self.tokenizer, tokenizer_state(path), f"tokenizer checkpoint '{path}'")
        self.tokenizer.requires_grad_(False)
        self.memory_format = torch.channels_last if section.channels_last else torch.contiguous_format
        self.tokenizer.to(memory_format=self.memory_format)
        grid = image_size // self.tokenizer.factor
        if (grid, grid) != self.backbone.grid_size:
            raise ValueError(
                f"the tokenizer's token grid {grid}x{grid} (image size {image_size} / {self.tokenizer.factor}) must "
                f"equal the ViT's patch grid {self.backbone.grid_size} (model.img_size / model.patch_size); "
                "leave method.tokenizer.image_size unset to derive it from the model")
        self.head = MimHead(self.backbone.embed_dim, self.tokenizer.vocab_size, section.kernel_impl,
                            section.mask.num_masked)
        self.last_metrics: dict[str, torch.Tensor] = {}  # the last step's, read by `summary`

    # ---- stages and data ---------------------------------------------------------------------
    @classmethod
    def stages(cls, cfg: DictConfig) -> list[Stage]:
        if cfg.method.tokenizer.checkpoint is not None:
            return []
        # every key of tokenizer_training (its schema: StageTrainingConfig) is a trainer key of stage 1;
        # activation checkpointing is the ViT's memory setting: the conv tokenizer has no recomputation hook
        stage1 = {"trainer.activation_checkpointing": False,
                  **{f"trainer.{key}": value for key, value in cfg.method.tokenizer_training.items()}}
        export = Path(cfg.output_dir).resolve() / "tokenizer" / "export" / "method.safetensors"
        return [Stage("tokenizer", "peco_tokenizer", stage1),
                Stage("mim", settings={"method.tokenizer.checkpoint": str(export)})]

    @classmethod
    def timm_spec(cls, cfg: DictConfig) -> TimmSpec:
        return beit_timm_spec(cfg.model, cfg.method.view.mean, cfg.method.view.std)

    @classmethod
    def make_transform(cls, cfg: DictConfig) -> Callable[[Any, torch.Generator], dict[str, torch.Tensor]]:
        grid = cfg.model.img_size // cfg.model.patch_size
        masks = BlockMaskGenerator((grid, grid), cfg.method.mask)
        return MimTransform(cfg.method.view, cfg.model.img_size, tokenizer_image_size(cfg), masks)

    def train(self, mode: bool = True) -> "Peco":
        super().train(mode)
        self.tokenizer.eval()  # frozen target generator: no quantiser statistics, no dropout
        return self

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        mask = batch["mask"].flatten(1)
        view = batch["tokenizer_view"].contiguous(memory_format=self.memory_format)
        rows = self.head.masked_rows(mask)
        if self.soft_target_temperature is None:
            targets = self.tokenizer.tokenize(view).gather(1, rows)
        else:
            targets = self.tokenizer.soft_tokenize(view, rows, self.soft_target_temperature)
        hidden = self.backbone(batch["image"], mask, rows)  # (B, num_masked, C): the masked patches' tokens
        loss, accuracy = self.head(hidden, targets, self.label_smoothing)
        metrics = {"mim_accuracy": accuracy.detach()}  # tensors: read at log steps only
        self.last_metrics = {"mim_loss": loss.detach(), **metrics}
        return StepOutput(loss, metrics)

    @classmethod
    def frozen_forward_bytes(cls, cfg: DictConfig, batch_size: int) -> float:
        """The frozen tokenizer's no-grad forward: at most 4 fp32 feature maps of its first (full-resolution)
        level are alive at once (a ResBlock's input, normalised and activated maps, and its conv's output)."""
        width = cfg.method.tokenizer.autoencoder.base_width * cfg.method.tokenizer.autoencoder.channel_mult[0]
        return 4.0 * 4 * batch_size * width * tokenizer_image_size(cfg) ** 2

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature of the exported timm model (`forward_head(..., pre_logits=True)`): the final
        norm of the mean patch token (BEiT's fine-tuning input), or of [CLS] with `export_final_norm_as=norm`."""
        return self.backbone.pooled_features(images)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights for timm's `beit_*` models (loads with only the classifier head missing)."""
        return self.backbone.timm_state_dict()

    def summary(self) -> dict[str, Any]:
        return {f"final_{k}": round(float(v), 4) for k, v in self.last_metrics.items()}
