"""Frozen features, computed once per split and model, for the kNN and linear-probe protocols.

A feature extractor is any callable `(B, 3, H, W) normalised float images -> {kind: (B, C)}` (or one (B, C)
tensor, used for every kind), so a generic torch network evaluates as well as a timm ViT. For timm models,
`TimmFeatures` gives the two kinds the protocols use:
- "pooled": `forward_head(forward_features(x), pre_logits=True)`, the feature timm's classifier sees (kNN);
- "tokens": [CLS] and the mean patch token of a chosen block, concatenated (the linear probe, BEiT style).
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ssl_zoo.errors import UserError

Features = dict[str, torch.Tensor]
Extractor = Callable[[torch.Tensor], Union[torch.Tensor, Features]]
KINDS = ("pooled", "tokens")


class TimmFeatures:
    """Both feature kinds of a timm model in one forward pass; `block` is 1-based (None: the last block)."""

    def __init__(self, model: torch.nn.Module, block: Optional[int] = None) -> None:
        self.model = model.eval()
        self._tokens: Optional[torch.Tensor] = None
        blocks = getattr(model, "blocks", None)
        if blocks is None:  # not a ViT: its pooled feature serves both protocols
            if block is not None:
                raise UserError(f"protocol.block={block}: this model has no transformer blocks to choose from")
            return
        depth = len(blocks)
        if block is not None and not 1 <= block <= depth:
            raise UserError(f"protocol.block={block} must lie in 1..{depth} (the model's blocks)")
        self.prefix = getattr(model, "num_prefix_tokens", 1)
        blocks[(block or depth) - 1].register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._tokens = output

    def __call__(self, images: torch.Tensor) -> Features:
        pooled = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        if self._tokens is None:
            return {"pooled": pooled, "tokens": pooled}
        tokens, self._tokens = self._tokens, None
        cls_and_mean = torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(dim=1)], dim=1)
        return {"pooled": pooled, "tokens": cls_and_mean}


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float, normalised like the backbone's training data."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


@torch.no_grad()
def compute_features(extract: Extractor, split: torch.utils.data.Dataset, mean: Sequence[float],
                     std: Sequence[float], batch_size: int = 128, device: torch.device = torch.device("cpu"),
                     num_workers: int = 0, progress: Optional[bool] = None, desc: str = "features"
                     ) -> tuple[Features, float]:
    """Every image of `split` through `extract`; returns the features (on CPU) and images per second."""
    loader = torch.utils.data.DataLoader(split, batch_size=batch_size, num_workers=num_workers)
    parts: dict[str, list[torch.Tensor]] = {}
    started = time.perf_counter()
    for images, _ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        out = extract(normalise(images.to(device), mean, std))
        for kind, value in (out.items() if isinstance(out, dict) else ((k, out) for k in KINDS)):
            parts.setdefault(kind, []).append(value.float().flatten(1).cpu())
    elapsed = time.perf_counter() - started
    return {kind: torch.cat(values) for kind, values in parts.items()}, len(split) / max(elapsed, 1e-9)
