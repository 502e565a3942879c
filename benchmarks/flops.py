"""FLOPs per image of a PeCo pretraining step (fvcore, attention included) and measured matmul rates.

fvcore counts one multiply-add as one "flop" and has no handle for `aten::scaled_dot_product_attention`,
which timm's fused attention calls: it skips it with a warning (ViT-B/16 at 224 px: 16.9 G counted, 0.7 G
of attention missing). `sdpa_flop_jit` counts it (QK^T and AV: B*H*N*S*(d + dv) multiply-adds). Figures
here are FLOPs = 2 x multiply-adds, the unit in which matmul rates and device peaks are quoted.

Step FLOPs per image = tokenizer forward (fvcore on encoder + quant conv, plus the lookup's 2*K*D per token)
+ 3 x backbone forward (backward ~ 2 x forward) + 6*H*V per masked token (head forward and backward).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from fvcore.nn import FlopCountAnalysis
from fvcore.nn.jit_handles import get_shape
from torch import nn

#: dense bf16 peaks (TFLOP/s, no sparsity) of the GPUs this project is benchmarked on, by name fragment
GPU_BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0}


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle: multiply-adds of scaled_dot_product_attention (q: ..., N, d; k: ..., S, d; v: ..., S, dv)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    batch_heads = 1
    for size in q[:-2]:
        batch_heads *= size
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


class _Call(nn.Module):
    """Expose one method of a module as `forward`, which is what fvcore traces (the module is a child, so
    its weights are traced as parameters, not as constants)."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module, self.name = module, name

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.name)(*args)


def count_macs(module: nn.Module, name: str, *inputs: torch.Tensor) -> tuple[int, int, list[str]]:
    """(multiply-adds, of which attention, skipped ops) of `module.<name>(*inputs)`."""
    analysis = FlopCountAnalysis(_Call(module, name), inputs).set_op_handle(
        "aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    attention = analysis.by_operator().get("scaled_dot_product_attention", 0)
    return int(analysis.total()), int(attention), sorted(analysis.unsupported_ops())


@torch.no_grad()
def step_flops(method: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """FLOPs per image of each part of a PeCo step, from the first image of `batch` (on CPU, fp32)."""
    method = method.float().cpu().eval()
    image = batch["image"][:1].float().cpu()
    mask = batch["mask"][:1].cpu().flatten(1)
    view = batch["tokenizer_view"][:1].float().cpu().contiguous(memory_format=torch.channels_last)
    tok_macs, _, tok_skipped = count_macs(method.tokenizer, "encode_latent", view)
    tokens = mask.shape[1]
    codes = method.tokenizer.quantizer.codebook
    lookup_macs = tokens * codes.shape[0] * codes.shape[1]
    with_sdpa, attention, skipped = count_macs(method.backbone, "forward_mim", image, mask)
    masked = int(mask.sum())
    head_macs = masked * method.head.in_features * method.head.out_features
    parts = {
        "tokenizer": 2 * (tok_macs + lookup_macs),
        "backbone_forward": 2 * with_sdpa,
        "backbone_backward": 4 * with_sdpa,
        "head_loss": 6 * head_macs,
    }
    return {
        "per_image": parts,
        "step_per_image": sum(parts.values()),
        "backbone_forward_gmacs": with_sdpa / 1e9,
        "backbone_attention_gmacs": attention / 1e9,  # what fvcore skips without the handle
        "skipped_ops": sorted(set(skipped) | set(tok_skipped)),
    }


def matmul_rate(dtype: torch.dtype, device: torch.device, size: int, repeats: int = 20) -> float:
    """Best-of-`repeats` FLOP/s of a square `size` matmul: the rate this device really reaches now (many
    short repeats, so that on a shared CPU at least one of them falls between other processes' bursts)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first call is a warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a known GPU in FLOP/s; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in GPU_BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return tflops * 1e12
    return None
