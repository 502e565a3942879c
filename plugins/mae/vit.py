"""MAE's networks: a timm ViT encoder that sees only the visible patches, and the light decoder with mask tokens.

The encoder is timm's `VisionTransformer` (no classifier) with a fixed 2-D sin-cos position embedding held as
a buffer, so its state dict is timm's `vit_*` layout and loads into `timm.create_model("vit_base_patch16_224")`
and friends with only the head missing. Masking follows MAE: per sample, the patches are ordered by a uniform
noise (drawn by the data transform, so it is reproducible and resumable), the first `num_keep` are kept, and
`ids_restore` lets the decoder put every token back in place.
"""
from __future__ import annotations

from functools import partial

import torch
from timm.layers import LayerNorm
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_zoo.method import TimmSpec
from ssl_zoo.registry import BACKBONES

from .config import MaeVitConfig

NORM = partial(LayerNorm, eps=1e-6)  # MAE's and timm's ViT norm


def sincos_pos_embed(grid: tuple[int, int], dim: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(1, 1 + h * w, dim) fixed 2-D sin-cos embedding, zeros for the [CLS] slot (as MAE)."""
    patches = build_sincos2d_pos_embed(list(grid), dim=dim, device=device)
    return torch.cat([torch.zeros(1, dim, device=patches.device), patches]).unsqueeze(0)


def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation: Xavier-uniform linear layers (the patch projection as one), zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if recompute and torch.is_grad_enabled() else block(x)
    return x


class MaeEncoder(VisionTransformer):
    """timm's ViT (no classifier, final norm over all tokens) that encodes only the patches a mask keeps."""

    def __init__(self, cfg: MaeVitConfig, device: torch.device | str | None = None) -> None:
        super().__init__(
            img_size=cfg.img_size, patch_size=cfg.patch_size, num_classes=0, global_pool="token",
            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
            qkv_bias=cfg.qkv_bias, norm_layer=NORM, pos_embed="none",
            device=device)
        del self.pos_embed  # timm's learnable slot (None here) gives way to the fixed buffer
        self.register_buffer("pos_embed", sincos_pos_embed(self.patch_embed.grid_size, cfg.embed_dim, device))
        self.global_pool_export = cfg.global_pool
        mae_init_(self)
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(self, images: torch.Tensor, noise: torch.Tensor, num_keep: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) images and (B, N) noise -> normalised tokens of [CLS] + the `num_keep` patches of lowest
        noise (B, 1 + num_keep, C), the mask (B, N; 1 = hidden) and `ids_restore` (B, N). Masked encoding is
        the module's `forward` because ZeRO-3 gathers a module's own parameters ([CLS]) only around it."""
        x = self.patch_embed(images) + self.pos_embed[:, 1:]
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        kept = ids_shuffle[:, :num_keep]
        x = x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        mask = torch.ones_like(noise)
        mask[:, :num_keep] = 0
        mask = mask.gather(1, ids_restore)
        return self.norm(self._encode(x)), mask, ids_restore

    def _encode(self, patches: torch.Tensor) -> torch.Tensor:
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        x = self.norm_pre(torch.cat([cls, patches], dim=1))
        return _run_blocks(self.blocks, x, self.grad_checkpointing)

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C) features of the whole image, pooled as the exported timm model pools them (`global_pool`)."""
        tokens = self._encode(self.patch_embed(images) + self.pos_embed[:, 1:])
        if self.global_pool_export == "avg":
            return self.norm(tokens[:, 1:].mean(dim=1))
        return self.norm(tokens)[:, 0]

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the layout of timm's `vit_*` models with the configured `global_pool`: the final norm is
        `fc_norm` under "avg" (timm then has no `norm`), `norm` under "token"."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.global_pool_export == "avg":
            for suffix in ("weight", "bias"):
                state[f"fc_norm.{suffix}"] = state.pop(f"norm.{suffix}")
        return state


class MaeDecoder(nn.Module):
    """Light transformer that fills the hidden slots with a shared mask token and predicts every patch's pixels."""

    def __init__(self, cfg: MaeVitConfig, grid: tuple[int, int], device: torch.device | str | None = None) -> None:
        super().__init__()
        width = cfg.decoder_embed_dim
        self.embed = nn.Linear(cfg.embed_dim, width, device=device)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width, device=device))
        self.register_buffer("pos_embed", sincos_pos_embed(grid, width, device))
        self.blocks = nn.Sequential(*(Block(width, cfg.decoder_num_heads, cfg.mlp_ratio, qkv_bias=True,
                                            norm_layer=NORM, device=device) for _ in range(cfg.decoder_depth)))
        self.norm = NORM(width, device=device)
        self.pred = nn.Linear(width, cfg.patch_size**2 * 3, device=device)
        self.grad_checkpointing = False
        mae_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, 1 + kept, C) and `ids_restore` (B, N) -> pixel predictions (B, N, patch^2 * 3)."""
        x = self.embed(latent)
        hidden = ids_restore.shape[1] + 1 - x.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.to(x.dtype).expand(x.shape[0], hidden, -1)], dim=1)
        patches = patches.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = _run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.pred(self.norm(x))[:, 1:]


def mae_vit_timm_spec(section: MaeVitConfig, mean: list[float], std: list[float]) -> TimmSpec:
    """The timm `vit_*` model that `timm_state_dict()` loads into (every size through explicit arguments)."""
    model_args = dict(img_size=section.img_size, patch_size=section.patch_size, embed_dim=section.embed_dim,
                      depth=section.depth, num_heads=section.num_heads, mlp_ratio=section.mlp_ratio,
                      qkv_bias=section.qkv_bias, global_pool=section.global_pool)
    return TimmSpec("vit_base_patch16_224", model_args, (3, section.img_size, section.img_size), tuple(mean),
                    tuple(std))


@BACKBONES.register("mae_vit", schema=MaeVitConfig)
def build_mae_vit(section: MaeVitConfig, device: torch.device | str | None = None) -> MaeEncoder:
    """Build the encoder of a `model` section (`device="meta"` to count parameters without memory)."""
    return MaeEncoder(section, device=device)
