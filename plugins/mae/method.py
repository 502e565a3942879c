"""`method=mae`: masked autoencoders (He et al. 2021), the masked-image-modelling baseline PeCo is compared with.

Per sample, 75% of the patches are hidden (argsort of the transform's uniform noise); the encoder sees only
the visible ones plus [CLS]; the decoder puts mask tokens in the hidden slots and predicts every patch's
pixels; the loss is the mean squared error on the hidden patches only, against pixels normalised per patch
(`norm_pix_loss`). The exported backbone is the encoder in timm's `vit_*` layout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from ssl_zoo.method import Method, StepOutput, TimmSpec
from ssl_zoo.registry import BACKBONES, METHODS

from .config import MaeConfig
from .transforms import MaeTransform
from .vit import MaeDecoder, mae_vit_timm_spec

def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch^2 * 3), patches in row-major order, pixels (row, column, channel)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, (h, w) = patches.shape[0], grid
    x = patches.reshape(b, h, w, patch, patch, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, h * patch, w * patch)


@METHODS.register("mae", schema=MaeConfig)
class Mae(Method):
    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.encoder = BACKBONES.build(cfg.model)
        self.grid = tuple(self.encoder.patch_embed.grid_size)
        self.decoder = MaeDecoder(cfg.model, self.grid)
        self.patch = cfg.model.patch_size
        self.num_keep = int(self.encoder.num_patches * (1 - cfg.method.mask_ratio))
        self.norm_pix_loss = cfg.method.norm_pix_loss
        self.mean, self.std = list(cfg.method.view.mean), list(cfg.method.view.std)

    # ---- config and data --------------------------------------------------------------------
    @classmethod
    def timm_spec(cls, cfg: DictConfig) -> TimmSpec:
        return mae_vit_timm_spec(cfg.model, cfg.method.view.mean, cfg.method.view.std)

    @classmethod
    def make_transform(cls, cfg: DictConfig) -> Callable[[Any, torch.Generator], dict[str, torch.Tensor]]:
        num_patches = (cfg.model.img_size // cfg.model.patch_size) ** 2
        return MaeTransform(cfg.method.view, cfg.model.img_size, num_patches)

    # ---- training ----------------------------------------------------------------------------
    def _targets(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-patch pixel targets, and the per-patch mean and std they were normalised with."""
        target = patchify(images, self.patch)
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean, std = target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        return (target - mean) / std, mean, std

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> StepOutput:
        latent, mask, ids_restore = self.encoder(batch["image"], batch["noise"], self.num_keep)
        pred = self.decoder(latent, ids_restore)
        target, _, _ = self._targets(batch["image"])
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return StepOutput(loss)

    # ---- evaluation and export ---------------------------------------------------------------
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """The whole image through the encoder, pooled as the exported timm model pools (`model.global_pool`)."""
        return self.encoder.pooled_features(images)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder for timm's `vit_*` models (loads with only the classifier head missing)."""
        return self.encoder.timm_state_dict()

    @torch.no_grad()
    def visualize(self, batch: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
        """`reconstructions.png`: one row per image (up to 8): masked input, reconstruction with the visible
        patches pasted in (as MAE shows it), original. Under `norm_pix_loss` the model predicts each patch's
        normalised pattern only, so the picture takes each hidden patch's mean and std from the original."""
        was_training = self.training
        self.eval()
        images, noise = batch["image"][:8].float(), batch["noise"][:8]
        latent, mask, ids_restore = self.encoder(images, noise, self.num_keep)
        _, mean, std = self._targets(images)
        pixels = unpatchify(self.decoder(latent, ids_restore).float() * std + mean, self.patch, self.grid)
        hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, self.patch**2 * 3), self.patch, self.grid)
        self.train(was_training)
        mean_rgb = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std_rgb = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        show = lambda x: (x * std_rgb + mean_rgb).clamp(0, 1)  # noqa: E731
        original = show(images)
        masked = original * (1 - hidden) + 0.5 * hidden
        reconstruction = original * (1 - hidden) + show(pixels) * hidden
        rows = torch.stack([masked, reconstruction, original], dim=1).flatten(0, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "reconstructions.png"
        save_image(rows.cpu(), path, nrow=3, padding=2, pad_value=1.0)
        return [path]
