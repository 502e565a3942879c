"""Typed config schemas of the MAE plugin (merged by the core with plugins/mae/configs/method/mae.yaml and
plugins/mae/configs/model/mae_vit_*.yaml), with the limits and cross-key rules the core checks before any work.

The defaults are the tiny CPU run's (`python -m ssl_zoo.run method=mae`); the paper's full-scale recipes live
in configs/experiment/mae_vit_*.yaml. The decoder's shape sits with the model (MAE defines it per model size:
8 blocks x 512 at every size from ViT-B up), the masking and the loss with the method.

No `from __future__ import annotations` here: OmegaConf reads these annotations at run time.
"""
from dataclasses import dataclass, field
from typing import List

from omegaconf import DictConfig

from ssl_zoo.schema import ConfigError, Limits, bad_value, checked

MODEL_FAMILY = "mae_vit"


@dataclass
class MaeVitConfig:
    """A ViT encoder that sees only the visible patches, plus MAE's light decoder. Defaults: ViT-Tiny/16 at 96 px."""

    name: str = MODEL_FAMILY
    img_size: int = checked(96, ge=1)
    patch_size: int = checked(16, ge=1)
    embed_dim: int = checked(192, ge=4)
    depth: int = checked(12, ge=1)
    num_heads: int = checked(3, ge=1)
    mlp_ratio: float = checked(4.0, gt=0)
    qkv_bias: bool = True
    decoder_embed_dim: int = checked(128, ge=4)
    decoder_depth: int = checked(4, ge=1)
    decoder_num_heads: int = checked(4, ge=1)
    # how the exported backbone pools, i.e. which timm `global_pool` it loads into: "avg" (MAE's fine-tuning:
    # mean of the patch tokens, the pre-trained final norm becomes timm's fc_norm) or "token" ([CLS] after norm)
    global_pool: str = checked("avg", choices=("avg", "token"))

    @staticmethod
    def validate(model: DictConfig, root: DictConfig) -> None:
        if model.img_size % model.patch_size:
            raise bad_value("model.img_size", model.img_size, f"a multiple of model.patch_size ({model.patch_size})")
        for prefix in ("", "decoder_"):
            width, heads = model[f"{prefix}embed_dim"], model[f"{prefix}num_heads"]
            if width % 4 or width % heads:
                raise bad_value(f"model.{prefix}embed_dim", width, "a multiple of 4 (sin-cos position terms) and "
                                f"of model.{prefix}num_heads ({heads})")


@dataclass
class MaeViewConfig:
    """MAE's only augmentation: a random resized crop and a horizontal flip (no colour jitter)."""

    scale: List[float] = checked(lambda: [0.2, 1.0], length=2, each=Limits(gt=0, le=1))
    ratio: List[float] = checked(lambda: [0.75, 1.3333333], length=2, each=Limits(gt=0))
    flip_prob: float = checked(0.5, ge=0, le=1)
    mean: List[float] = checked(lambda: [0.485, 0.456, 0.406], length=3)
    std: List[float] = checked(lambda: [0.229, 0.224, 0.225], length=3, each=Limits(gt=0))


@dataclass
class MaeConfig:
    """Masked autoencoder pre-training (He et al. 2021)."""

    name: str = "mae"
    mask_ratio: float = checked(0.75, gt=0, lt=1)  # share of patches hidden from the encoder, drawn per sample
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by the patch's own mean and std
    view: MaeViewConfig = field(default_factory=MaeViewConfig)

    @staticmethod
    def validate(method: DictConfig, root: DictConfig) -> None:
        if root.model.name != MODEL_FAMILY:
            raise ConfigError(f"method=mae needs a model of the {MODEL_FAMILY} family (model=mae_vit_tiny ... "
                              f"mae_vit_huge), got model.name={root.model.name}")
        patches = (root.model.img_size // root.model.patch_size) ** 2
        if int(patches * (1 - method.mask_ratio)) < 1:
            raise bad_value("method.mask_ratio", method.mask_ratio, f"one that keeps a patch of {patches}")
