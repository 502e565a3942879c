"""BEiT backbone: timm-compatible weights, mask token, and the parameter counts of the full-scale sizes."""
from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf
from timm.models.beit import Beit

from ssl_zoo.config import load_config
from ssl_zoo_peco.beit import BeitMIM, build_beit
from ssl_zoo_peco.config import BeitConfig

SMALL = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def small(**kwargs) -> BeitMIM:
    torch.manual_seed(0)
    return BeitMIM(OmegaConf.structured(BeitConfig(**{**SMALL, **kwargs})))


@pytest.mark.parametrize(("model", "millions"), [("beit_base", 86), ("beit_large", 304), ("beit_huge", 632)])
def test_full_scale_sizes_build_on_meta_with_the_expected_parameter_count(model: str, millions: float) -> None:
    cfg = load_config(["method=peco", f"model={model}"])
    net = build_beit(cfg.model, device="meta")
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)
    assert all(p.is_meta for p in net.parameters())


def test_backbone_loads_into_timm_beit_base_with_only_the_head_missing() -> None:
    cfg = load_config(["method=peco", "model=beit_base"])
    ours = build_beit(cfg.model)
    theirs = timm.create_model("beit_base_patch16_224", pretrained=False)
    result = theirs.load_state_dict(ours.timm_state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []


def test_vit_huge_state_matches_timm_beit_of_that_size() -> None:
    cfg = load_config(["method=peco", "model=beit_huge"])
    ours = build_beit(cfg.model, device="meta").timm_state_dict()
    theirs = Beit(patch_size=14, embed_dim=1280, depth=32, num_heads=16, use_abs_pos_emb=False,
                  use_rel_pos_bias=True, init_values=1e-5, device="meta").state_dict()
    assert set(theirs) - set(ours) == {"head.weight", "head.bias"} and set(ours) <= set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_exported_weights_reproduce_the_features_in_timm() -> None:
    """The shared relative position bias copied into every block gives the same network in timm."""
    ours = small(export_final_norm_as="norm").eval()
    with torch.no_grad():  # make the shared bias non-trivial so the copy matters
        ours.rel_pos_bias.relative_position_bias_table.normal_()
    theirs = Beit(**SMALL, use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, global_pool="token",
                  num_classes=0).eval()
    theirs.load_state_dict(ours.timm_state_dict())
    x = torch.randn(2, 3, 64, 64)
    assert torch.allclose(ours.forward_features(x), theirs.forward_features(x), atol=1e-5)


def test_default_export_puts_the_final_norm_where_timm_pools() -> None:
    ours = small()
    state = ours.timm_state_dict()
    assert "norm.weight" not in state and torch.equal(state["fc_norm.weight"], ours.norm.weight)
    assert "mask_token" not in state and "rel_pos_bias.relative_position_bias_table" not in state


def test_mask_token_replaces_masked_patches_only() -> None:
    net = small(drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    none = torch.zeros(1, 16, dtype=torch.bool)
    assert torch.allclose(net.forward_mim(x, none), net.forward_features(x), atol=1e-6)
    mask = none.clone()
    mask[0, :8] = True
    other = x.clone()
    other[..., :32, :] = torch.randn(1, 3, 32, 64)  # change exactly the masked patches (top two rows)
    assert torch.allclose(net.forward_mim(x, mask), net.forward_mim(other, mask), atol=1e-5)
    assert not torch.allclose(net.forward_mim(x, mask), net.forward_features(x), atol=1e-3)


def test_mask_token_gets_no_weight_decay() -> None:
    assert "mask_token" in small().no_weight_decay()


def test_activation_checkpointing_recomputes_the_blocks_and_changes_no_number() -> None:
    net = small(drop_path_rate=0.3)  # drop path draws random numbers: the recomputation must redraw the same
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 16) < 0.4
    calls = []
    for blk in net.blocks:
        blk.register_forward_pre_hook(lambda module, args, kwargs: calls.append(module), with_kwargs=True)

    def step(checkpointing: bool) -> tuple[torch.Tensor, list[torch.Tensor], int]:
        net.set_grad_checkpointing(checkpointing)
        net.zero_grad()
        calls.clear()
        torch.manual_seed(1)
        out = net(x, mask)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()], len(calls)

    out, grads, block_calls = step(False)
    out_ckpt, grads_ckpt, block_calls_ckpt = step(True)
    assert block_calls == len(net.blocks) and block_calls_ckpt == 2 * len(net.blocks)  # recomputed in backward
    assert torch.equal(out, out_ckpt)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_ckpt))


@pytest.mark.parametrize("per_block_bias", [False, True])
def test_masked_rows_forward_equals_the_full_forward_at_those_rows(per_block_bias: bool) -> None:
    """The MIM loss reads the masked patches only, so the last block computes just those: the same tokens
    and the same gradients as the full forward gathered at the rows."""
    torch.manual_seed(0)
    net = BeitMIM(OmegaConf.structured(BeitConfig(**{**SMALL, "depth": 3, "drop_path_rate": 0.0})))
    if per_block_bias:  # timm's per-block tables (as after the export) on top of the shared one
        for blk in net.blocks:
            blk.attn.relative_position_bias_table = torch.nn.Parameter(
                torch.randn(net.rel_pos_bias.relative_position_bias_table.shape))
            blk.attn.relative_position_index = net.rel_pos_bias.relative_position_index.clone()
            blk.attn.window_size = net.rel_pos_bias.window_size
    with torch.no_grad():
        net.rel_pos_bias.relative_position_bias_table.normal_()
    x = torch.randn(3, 3, 64, 64)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    for i, start in enumerate((0, 5, 9)):
        mask[i, start:start + 6] = True
    rows = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :6]
    weights = torch.randn(3, 6, SMALL["embed_dim"])

    def loss_and_grads(tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss = (tokens * weights).sum()
        return tokens, list(torch.autograd.grad(loss, list(net.parameters()), allow_unused=True))

    full, full_grads = loss_and_grads(net(x, mask)[:, 1:].gather(1, rows.unsqueeze(-1).expand(-1, -1, 64)))
    part, part_grads = loss_and_grads(net(x, mask, rows))
    assert part.shape == (3, 6, 64)
    assert torch.allclose(part, full, atol=1e-5)
    for a, b in zip(full_grads, part_grads):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-4))
