"""VQGAN-style convolutional encoder and decoder, and the tokenizer that joins them through the quantiser.

The architecture follows the VQGAN paper's description (ResNet blocks with GroupNorm and SiLU, strided-conv
downsampling, nearest-neighbour upsampling, one self-attention block at the lowest resolution, 1x1 convs
before and after quantisation). Each entry of `channel_mult` is one resolution level; all levels but the
last halve the resolution, so the downsampling factor is 2 ** (len(channel_mult) - 1): 8 in the tiny default,
16 at full scale; the tokenizer's view is sized so that its token grid equals the ViT's patch grid.

Optionally (`colour_skip`, the tiny default, not VQGAN's) a linear colour path runs beside the conv stacks:
the encoder adds a 1x1 projection of each token's average colour to the latent, the decoder adds a 1x1
projection of the quantised latent to RGB, upsampled bilinearly. Joined through it alone they are the
token-grid thumbnail, so a short run starts from there and the convs learn the detail; the colour still
travels through the codes (decoding another image's codes gives its colours). `patch_skip` (also the tiny
default) does the same for each token's pixels: a linear map of the token's f x f x 3 pixels into the latent
(pixel-unshuffle, 1x1 conv) and back from it and its neighbours' (3x3 conv, pixel-shuffle: the neighbours let it
blend across token edges instead of painting blocks), a learned patch-VQ coder, which in so short a run the
conv stacks alone do not learn to match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AutoencoderConfig, TokenizerConfig
from .quantizer import Quantized, VectorQuantizer


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map (used at the lowest resolution)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad: exact halving of even sizes


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _middle(channels: int, cfg: AutoencoderConfig) -> nn.Sequential:
    layers: list[nn.Module] = [ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)]
    if cfg.attention_at_lowest:
        layers += [AttnBlock(channels, cfg.norm_groups), ResBlock(channels, channels, cfg.norm_groups, cfg.dropout)]
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        cin = widths[0]
        for level, cout in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(cin, cout, cfg.norm_groups, cfg.dropout))
                cin = cout
            if level < len(widths) - 1:
                layers.append(Downsample(cin))
        layers += [_middle(cin, cfg), _norm(cin, cfg.norm_groups), nn.SiLU(), nn.Conv2d(cin, cfg.z_channels, 3, padding=1)]
        self.layers = nn.Sequential(*layers)
        self.factor = 2 ** (len(widths) - 1)
        self.colour = nn.Conv2d(3, cfg.z_channels, 1) if cfg.colour_skip else None
        self.patch = nn.Conv2d(3 * self.factor**2, cfg.z_channels, 1) if cfg.patch_skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.layers(x)
        if self.patch is not None:  # each token's pixels, linearly
            z = z + self.patch(F.pixel_unshuffle(x, self.factor))
        if self.colour is not None:  # each token's average colour, handed to the latent directly
            z = z + self.colour(F.avg_pool2d(x, self.factor))
        return z


class Decoder(nn.Module):
    """Mirror of the encoder with one more ResBlock per level (as VQGAN); `last_layer` is the output conv,
    where the adaptive GAN weight compares gradient norms."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths = [cfg.base_width * m for m in cfg.channel_mult][::-1]
        cin = widths[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.z_channels, cin, 3, padding=1), _middle(cin, cfg)]
        for level, cout in enumerate(widths):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(cin, cout, cfg.norm_groups, cfg.dropout))
                cin = cout
            if level < len(widths) - 1:
                layers.append(Upsample(cin))
        layers += [_norm(cin, cfg.norm_groups), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.last_layer = nn.Conv2d(cin, 3, 3, padding=1)
        self.factor = 2 ** (len(widths) - 1)
        self.colour = nn.Conv2d(cfg.z_channels, 3, 1) if cfg.colour_skip else None
        self.patch = nn.Conv2d(cfg.z_channels, 3 * self.factor**2, 3, padding=1) if cfg.patch_skip else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.last_layer(self.layers(z))
        if self.patch is not None:
            out = out + F.pixel_shuffle(self.patch(z), self.factor)
        if self.colour is not None:  # each token's colour, upsampled bilinearly: the decoder adds the detail
            out = out + F.interpolate(self.colour(z), scale_factor=float(self.factor), mode="bilinear",
                                      align_corners=False)
        return out


class VQTokenizer(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> code indices (B, H/f, W/f), and back to pixels."""

    def __init__(self, cfg: TokenizerConfig, image_size: int, kernel_impl: str = "auto") -> None:
        super().__init__()
        self.factor = 2 ** (len(cfg.autoencoder.channel_mult) - 1)
        self.image_size = image_size
        if image_size % self.factor:
            raise ValueError(f"the tokenizer image size {image_size} is not a multiple of the "
                             f"downsampling factor {self.factor} (2 ** (len(channel_mult) - 1))")
        self.encoder = Encoder(cfg.autoencoder)
        self.quant_conv = nn.Conv2d(cfg.autoencoder.z_channels, cfg.quantizer.dim, 1)
        self.quantizer = VectorQuantizer(cfg.quantizer, kernel_impl)
        self.post_quant_conv = nn.Conv2d(cfg.quantizer.dim, cfg.autoencoder.z_channels, 1)
        self.decoder = Decoder(cfg.autoencoder)

    @property
    def vocab_size(self) -> int:
        return self.quantizer.cfg.num_codes

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        """Reconstruction and the quantiser's output (training: dead codes restart before the lookup)."""
        z = self.encode_latent(images)
        if self.training:
            self.quantizer.restart_dead(z)
        quantized = self.quantizer(z)
        return self.decoder(self.post_quant_conv(quantized.z_q)), quantized

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices (B, H/f * W/f): the MIM targets of stage 2."""
        return self.quantizer.encode(self.encode_latent(images)).flatten(1)

    @torch.no_grad()
    def soft_tokenize(self, images: torch.Tensor, rows: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft MIM targets of the token positions `rows` (B, M): a distribution over the codebook per position,
        softmax(-squared distance / temperature) of its latent to each code, (B, M, num_codes). Its mode is the
        code `tokenize` gives; as the temperature falls it becomes that code's one-hot."""
        latents = self.encode_latent(images).flatten(2).transpose(1, 2)  # (B, N, D)
        latents = latents.gather(1, rows.unsqueeze(-1).expand(-1, -1, latents.shape[-1]))
        distances = self.quantizer.squared_distances(latents.flatten(0, 1)).view(*rows.shape, -1)
        return torch.softmax(-distances / temperature, dim=-1)
