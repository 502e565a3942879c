"""How much of its input a tokenizer's codes carry, measured on held-out crops against floors from the same run.

Losses on training batches hide a tokenizer that ignores its input (a decoder that paints the mean image,
a codebook whose usage is 100% while it says nothing). So stage 1 ends by decoding crop_id's test crops
(regions of the photos that pretraining never sees) and reports, beside the reconstruction's PSNR and
perceptual distance, three floors:
- `constant`: the best constant image (each channel's mean over the held-out crops);
- `shuffled`: each crop decoded from another crop's codes (a fixed random derangement of the batch), i.e. what
  the decoder produces from codes that carry nothing about this image;
- `thumbnail`: each token's average colour, upsampled bilinearly: what one exact colour per token gives.
A tokenizer that works beats all three: its codes say more than one average colour per token.
PSNR is per image on pixels in [0, 1], averaged over images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .perceptual import PerceptualLoss
from .vqgan import VQTokenizer


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> float in [-1, 1], the tokenizer's convention."""
    return images.float() / 127.5 - 1.0


def psnr(estimate: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images given in [-1, 1], measured on [0, 1] pixels: (N,)."""
    mse = ((estimate.float().clamp(-1, 1) - target.float()) / 2).pow(2).flatten(1).mean(dim=1)
    return -10.0 * torch.log10(mse.clamp_min(1e-10))


def thumbnail(images: torch.Tensor, factor: int) -> torch.Tensor:
    """Average colour per `factor` x `factor` token, upsampled bilinearly back to the image size."""
    return F.interpolate(F.avg_pool2d(images, factor), size=images.shape[-2:], mode="bilinear", align_corners=False)


def derangement(n: int, seed: int = 0) -> torch.Tensor:
    """A random permutation with no fixed point (n >= 2): source index for each position."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    source = torch.empty(n, dtype=torch.long)
    source[order] = order.roll(-1)
    return source


@torch.no_grad()
def decode_codes(tokenizer: VQTokenizer, indices: torch.Tensor) -> torch.Tensor:
    """(B, h, w) code indices -> (B, 3, H, W) images."""
    codes = tokenizer.quantizer.codes()[indices].permute(0, 3, 1, 2)
    return tokenizer.decoder(tokenizer.post_quant_conv(codes.to(tokenizer.post_quant_conv.weight.dtype)))


@torch.no_grad()
def encode_codes(tokenizer: VQTokenizer, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, h, w) code indices."""
    return tokenizer.quantizer.encode(tokenizer.encode_latent(images))


@torch.no_grad()
def heldout_report(tokenizer: VQTokenizer, perceptual: PerceptualLoss, images: torch.Tensor,
                   batch_size: int = 48, memory_format: torch.memory_format = torch.contiguous_format,
                   ) -> tuple[dict[str, float], torch.Tensor]:
    """Figures (`heldout_*` keys) for uint8 held-out crops, and the reconstructions (in [-1, 1]).

    The tokenizer is switched to eval mode for the measurement and back afterwards."""
    was_training = tokenizer.training
    tokenizer.eval()
    x = to_unit_range(images)
    codes = torch.cat([encode_codes(tokenizer, b.contiguous(memory_format=memory_format))
                       for b in x.split(batch_size)])
    shuffled_codes = codes[derangement(len(codes))]
    recon = torch.cat([decode_codes(tokenizer, c) for c in codes.split(batch_size)]).float()
    shuffled = torch.cat([decode_codes(tokenizer, c) for c in shuffled_codes.split(batch_size)]).float()
    tokenizer.train(was_training)
    thumb = thumbnail(x, tokenizer.factor)
    constant = x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x)

    def distance(estimate: torch.Tensor) -> float:
        parts = [perceptual(e.clamp(-1, 1).contiguous(memory_format=memory_format),
                            t.contiguous(memory_format=memory_format)) * len(e)
                 for e, t in zip(estimate.split(batch_size), x.split(batch_size))]
        return float(sum(parts) / len(x))

    used = torch.unique(codes).numel()
    report = {
        "heldout_psnr": psnr(recon, x).mean().item(),
        "heldout_psnr_thumbnail": psnr(thumb, x).mean().item(),
        "heldout_psnr_shuffled": psnr(shuffled, x).mean().item(),
        "heldout_psnr_constant": psnr(constant, x).mean().item(),
        "heldout_perceptual": distance(recon),
        "heldout_perceptual_thumbnail": distance(thumb),
        "heldout_codes_used": float(used) / tokenizer.vocab_size,
    }
    return report, recon
