"""Typed config schemas of the MAE plugin (merged by the core with configs/method/mae.yaml and
configs/model/mae_vit_*.yaml).

The defaults are the tiny CPU run's (`python -m ssl_zoo.run method=mae`); the paper's full-scale recipes live
in configs/experiment/mae_vit_*.yaml. The decoder's shape sits with the model (MAE defines it per model size:
8 blocks x 512 at every size from ViT-B up), the masking and the loss with the method.

No `from __future__ import annotations` here: OmegaConf reads these annotations at run time.
"""
from dataclasses import dataclass, field
from typing import List


@dataclass
class MaeVitConfig:
    """A ViT encoder that sees only the visible patches, plus MAE's light decoder. Defaults: ViT-Tiny/16 at 96 px."""

    name: str = "mae_vit"
    img_size: int = 96
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    decoder_embed_dim: int = 128
    decoder_depth: int = 4
    decoder_num_heads: int = 4
    # how the exported backbone pools, i.e. which timm `global_pool` it loads into: "avg" (MAE's fine-tuning:
    # mean of the patch tokens, the pre-trained final norm becomes timm's fc_norm) or "token" ([CLS] after norm)
    global_pool: str = "avg"


@dataclass
class MaeViewConfig:
    """MAE's only augmentation: a random resized crop and a horizontal flip (no colour jitter)."""

    scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333])
    flip_prob: float = 0.5
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class MaeConfig:
    """Masked autoencoder pre-training (He et al. 2021)."""

    name: str = "mae"
    mask_ratio: float = 0.75  # share of patches hidden from the encoder, drawn per sample
    norm_pix_loss: bool = True  # targets: each patch's pixels normalised by the patch's own mean and std
    view: MaeViewConfig = field(default_factory=MaeViewConfig)
