"""The BEiT ViT backbone of stage 2, built on timm's `Beit` so its weights load into timm's `beit_*` models.

Pre-training uses BEiT's choices: a learnable mask token that replaces masked patch embeddings before
[CLS] is prepended, one relative position bias shared by all blocks, no absolute position embedding, layer
scale, q/v bias, drop path. For fine-tuning, timm's `beit_*` models have one bias table per block, so the
export copies the shared table into every block, as BEiT does when it starts fine-tuning.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.beit import Beit, Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssl_zoo.method import TimmSpec
from ssl_zoo.registry import BACKBONES

from .config import BeitConfig


class BeitMIM(Beit):
    """timm's Beit (no classifier, final norm over all tokens) plus a mask token for masked image modelling."""

    def __init__(self, cfg: BeitConfig, device: torch.device | str | None = None) -> None:
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"model.img_size={cfg.img_size} is not a multiple of model.patch_size={cfg.patch_size}")
        if cfg.export_final_norm_as not in ("fc_norm", "norm"):
            raise ValueError(f"model.export_final_norm_as must be 'fc_norm' or 'norm', got '{cfg.export_final_norm_as}'")
        super().__init__(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            num_classes=0,
            global_pool="",
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            mlp_ratio=cfg.mlp_ratio,
            drop_path_rate=cfg.drop_path_rate,
            norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps),
            init_values=cfg.init_values,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
            device=device,
        )
        self.export_final_norm_as = cfg.export_final_norm_as
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim, device=device))
        trunc_normal_(self.mask_token, std=0.02)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """timm's forward (features and head) without a mask, `forward_mim` with one. MIM goes through
        `forward` because ZeRO-3 gathers a module's own parameters (cls and mask tokens) only around it."""
        return super().forward(images) if mask is None else self.forward_mim(images, mask, rows)

    def forward_mim(self, images: torch.Tensor, mask: torch.Tensor,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) images and a (B, N) or (B, h, w) boolean mask -> (B, 1 + N, C) normalised tokens;
        with `rows` (B, M) patch indices, only those patches' tokens (B, M, C), which is all the MIM loss
        reads: the last block then computes its output for those M tokens alone (`block_at_rows`)."""
        return self.norm(self.block_tokens(images, mask, rows))

    def pooled_features(self, images: torch.Tensor) -> torch.Tensor:
        """What the exported timm model's `forward_head(forward_features(x), pre_logits=True)` computes."""
        x = self.block_tokens(images)
        return self.norm(x[:, 1:].mean(dim=1)) if self.export_final_norm_as == "fc_norm" else self.norm(x)[:, 0]

    def block_tokens(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1 + N, C) tokens after the last block, before the final norm; masked patches (if a mask is
        given) replaced by the mask token. With `rows` (B, M): the tokens of those patches only (B, M, C)."""
        x = self.patch_embed(images)
        if mask is not None:
            mask = mask.flatten(1).unsqueeze(-1).to(x.dtype)
            x = x * (1 - mask) + self.mask_token.to(x.dtype) * mask
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x)
        rel_pos_bias = self.rel_pos_bias()
        last = len(self.blocks) - 1 if rows is not None else len(self.blocks)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()  # trainer.activation_checkpointing
        for blk in self.blocks[:last]:
            if recompute:
                x = checkpoint(blk, x, shared_rel_pos_bias=rel_pos_bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=rel_pos_bias)
        if rows is None:
            return x
        tokens = rows + 1  # [CLS] comes first
        if recompute:
            return checkpoint(block_at_rows, self.blocks[last], x, tokens, rel_pos_bias, use_reentrant=False)
        return block_at_rows(self.blocks[last], x, tokens, rel_pos_bias)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights in the layout of timm's `beit_*` models (per-block relative position bias, no mask token).

        The final norm goes to `fc_norm` by default: timm's beit pools the patch tokens and normalises the
        pooled feature (BEiT's fine-tuning recipe), so that is where the pre-trained norm is useful.
        """
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        state.pop("mask_token")
        table = state.pop("rel_pos_bias.relative_position_bias_table")
        for i in range(len(self.blocks)):
            state[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
        if self.export_final_norm_as == "fc_norm":
            for suffix in ("weight", "bias"):
                state[f"fc_norm.{suffix}"] = state.pop(f"norm.{suffix}")
        return state


def block_at_rows(blk: Block, x: torch.Tensor, rows: torch.Tensor,
                  shared_rel_pos_bias: torch.Tensor | None) -> torch.Tensor:
    """`blk(x)` at the (B, M) token indices `rows` only, (B, M, C): keys and values still come from every
    token, but the attention, its projection and the MLP run for the M queries. In BEiT's last block the other
    tokens' outputs feed nothing the loss reads (at BEiT-Base's 75 of 196 masked patches that is 62% of the
    block's projection and MLP work, about 4% of the step's)."""
    attn = blk.attn
    batch, count, width = x.shape
    h = blk.norm1(x)
    if attn.q_bias is None:
        qkv = attn.qkv(h)
    else:
        qkv = F.linear(h, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
    q, k, v = qkv.reshape(batch, count, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = q.gather(2, rows[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[-1]))
    bias = None
    if attn.relative_position_bias_table is not None:
        bias = attn._get_rel_pos_bias()
    if shared_rel_pos_bias is not None:
        bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
    if bias is not None:  # (1 or B, heads, N, N) -> the selected query rows, (B, heads, M, N)
        bias = bias.expand(batch, -1, -1, -1) if bias.dim() == 4 else bias.unsqueeze(0).expand(batch, -1, -1, -1)
        bias = bias.gather(2, rows[:, None, :, None].expand(-1, bias.shape[1], -1, count))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                         dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(batch, rows.shape[1], -1)))
    x = x.gather(1, rows.unsqueeze(-1).expand(-1, -1, width))
    if blk.gamma_1 is None:
        x = x + blk.drop_path1(out)
        return x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    x = x + blk.drop_path1(blk.gamma_1 * out)
    return x + blk.drop_path2(blk.gamma_2 * blk.mlp(blk.norm2(x)))


def beit_timm_spec(section: BeitConfig, mean: list[float], std: list[float]) -> TimmSpec:
    """The timm `beit` model that `timm_state_dict()` loads into: per-block relative position bias, and the
    final norm as `fc_norm` after mean pooling (global_pool avg) or as `norm` before the [CLS] token."""
    if abs(section.layer_norm_eps - 1e-6) > 1e-12:
        raise ValueError(f"model.layer_norm_eps={section.layer_norm_eps} has no timm form: timm's beit uses 1e-6")
    model_args = dict(
        img_size=section.img_size, patch_size=section.patch_size, embed_dim=section.embed_dim,
        depth=section.depth, num_heads=section.num_heads, mlp_ratio=section.mlp_ratio, qkv_bias=section.qkv_bias,
        init_values=section.init_values, use_abs_pos_emb=False, use_rel_pos_bias=True,
        use_shared_rel_pos_bias=False, global_pool="avg" if section.export_final_norm_as == "fc_norm" else "token")
    return TimmSpec("beit_base_patch16_224", model_args, (3, section.img_size, section.img_size),
                    tuple(mean), tuple(std))


@BACKBONES.register("beit", schema=BeitConfig)
def build_beit(section: BeitConfig, device: torch.device | str | None = None) -> BeitMIM:
    """Build the BEiT backbone of a `model` section (`device="meta"` to count parameters without memory)."""
    return BeitMIM(section, device=device)
