"""Smoke test of the throughput benchmark at a tiny size: the report's structure and sane values, no timing
thresholds (other jobs share the machine). Cases run in this process (`--in-process`) to keep it short.
Also the statistics the benchmarks report."""
from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from benchmarks import throughput
from benchmarks.kernels_cpu import median_interval
from benchmarks.throughput_report import PART_NAMES
from benchmarks.throughput_step import (naive_masked_linear_cross_entropy, naive_vq_nearest, recomputed_activations,
                                        schedule)
from ssl_zoo_peco.beit import BeitMIM
from ssl_zoo_peco.config import BeitConfig


def test_naive_ops_match_the_fused_ones() -> None:
    """The unfused baseline must compute the same thing as the ops it replaces, or the comparison is void."""
    import ssl_zoo_kernels

    g = torch.Generator().manual_seed(0)
    z, codes = torch.randn(300, 16, generator=g), torch.randn(64, 16, generator=g)
    assert torch.equal(naive_vq_nearest(z, codes)[0], ssl_zoo_kernels.vq_nearest(z, codes, impl="torch")[0])
    hidden, weight = torch.randn(3, 10, 8, generator=g), torch.randn(32, 8, generator=g)
    targets, mask = torch.randint(0, 32, (3, 10), generator=g), torch.rand(3, 10, generator=g) < 0.4
    naive = naive_masked_linear_cross_entropy(hidden, weight, None, targets, mask=mask)
    fused = ssl_zoo_kernels.masked_linear_cross_entropy(hidden, weight, None, targets, mask=mask, impl="torch")
    assert torch.allclose(naive, fused, atol=1e-5)


def test_variants_warm_up_then_alternate_with_the_order_flipping_each_round() -> None:
    steps = schedule(["fused", "unfused"], warmup=1, repeats=3)
    assert [v for v, timed in steps if not timed] == ["fused", "unfused"]
    assert all(not timed for _, timed in steps[:2]) and all(timed for _, timed in steps[2:])
    rounds = [[v for v, _ in steps[2 + 2 * r: 4 + 2 * r]] for r in range(3)]
    assert rounds[0] == rounds[2] == rounds[1][::-1] and sorted(rounds[0]) == ["fused", "unfused"]


def test_recompute_variant_turns_checkpointing_on_for_its_steps_only() -> None:
    method = torch.nn.ModuleDict({"backbone": BeitMIM(OmegaConf.structured(BeitConfig(
        img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)))})
    with recomputed_activations(method):
        assert method["backbone"].grad_checkpointing
    assert not method["backbone"].grad_checkpointing


def test_tiny_run_writes_report_table_and_plot(tmp_path: Path) -> None:
    out, md = tmp_path / "report.json", tmp_path / "RESULTS.md"
    report = throughput.main([
        "model=beit_tiny", "model.depth=2", "--no-paper-tokenizer", "--batch", "2", "--main-warmup", "0",
        "--main-repeats", "1", "--warmup", "0", "--repeats", "1", "--sweep-batches", "1,2", "--sizes", "",
        "--matmul-size", "128", "--no-compile", "--no-zero", "--in-process", "--out", str(out),
        "--results-md", str(md),
    ])
    assert json.loads(out.read_text())["command"] == report["command"]
    assert out.with_suffix(".png").stat().st_size > 0
    table = md.read_text()
    assert "python -m benchmarks.throughput model=beit_tiny" in table and "| **whole step** |" in table

    main = report["main"]
    fused, unfused = main["fused"], main["unfused"]
    for result in (fused, unfused):
        assert result["images_per_s"] > 0 and result["peak_mib"] > 0
        assert set(result["parts"]) == set(PART_NAMES)
        assert all(part["s"] >= 0 for part in result["parts"].values())
        assert result["parts"]["head_loss"]["added_mib"] >= 0
    # activation checkpointing alternated with plain steps at the sweep model: both timed, with their parts
    recompute = report["recompute"]
    assert recompute["plain"]["order"] == recompute["recompute"]["order"] == ["fused", "recompute"]
    assert recompute["step_time_ratio"] > 0 and recompute["backbone_backward_time_ratio"] > 0
    assert "activation checkpointing" in table
    # the parts come from marks inside the same steps, so they add up to the whole step
    assert sum(p["s"] for p in fused["parts"].values()) == pytest.approx(fused["step_s"], rel=1e-6)
    assert report["flops"]["step_per_image"] > 0 and report["flops"]["backbone_attention_gmacs"] > 0
    assert report["rates"]["matmul_fp32_flops"] > 0 and report["rates"]["matmul_bf16_flops"] > 0
    assert main["achieved_flops"] > 0 and main["achieved_over_matmul_fp32"] > 0
    ratios = main["fused_vs_unfused"]
    assert ratios["step_speedup"] > 0 and ratios["head_loss_speedup"] > 0 and ratios["tokenizer_speedup"] > 0
    assert len(ratios["round_speedups"]) == 1 and fused["order"] == ["fused", "unfused"]
    memory_ratio = ratios["head_loss_memory_ratio"]  # None where the unfused part added no page (tiny sizes)
    assert memory_ratio is None or memory_ratio > 0
    assert [r["batch_size"] for r in report["sweep"]] == [1, 2]
    assert report["precision"]["bf16_speedup"] > 0


def test_median_interval_covers_the_true_median_about_95_percent_of_the_time() -> None:
    rng = random.Random()
    trials, n = 2000, 20
    covered = 0
    for _ in range(trials):
        sample = [rng.lognormvariate(0.0, 0.3) for _ in range(n)]  # true median exp(0) = 1
        low, high = median_interval(sample)
        assert low in sample and high in sample and low <= statistics.median(sample) <= high
        covered += low <= 1.0 <= high
    # Exact coverage for n = 20 is 95.9%; the band is 3.5 standard errors wide and excludes the full range.
    assert 0.94 <= covered / trials <= 0.975, covered / trials


def test_vs_timm_tiny_run_times_both_sides_on_the_same_work(tmp_path: Path) -> None:
    """Our step and timm's plain BEiT step alternate at a tiny size; the plain side computes the same loss."""
    from benchmarks import vs_timm

    md = tmp_path / "RESULTS.md"
    report = vs_timm.main(["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.img_size=32",
                           "method.mask.num_masked=2", "method.mask.min_block=1", "--batch", "2", "--rounds", "2",
                           "--precisions", "fp32", "--matmul-size", "64", "--out", str(tmp_path / "r.json"),
                           "--results-md", str(md)])
    (result,) = report["results"]
    assert result["order"] == ["ours", "timm", "timm", "ours"]
    assert set(result["variants"]) == {"ours", "timm"} and result["flops_per_step"] > 0
    assert all(v["images_per_s"] > 0 and v["share_of_matmul"] > 0 for v in result["variants"].values())
    assert len(result["speedups"]["ours_vs_timm"]["rounds"]) == 2
    assert set(report["optimizer"]) == {"loop", "foreach", "fused"}
    assert all(v["step_s"] > 0 for v in report["optimizer"].values())
    assert "python -m benchmarks.vs_timm model.embed_dim=32" in md.read_text()


def test_plain_timm_mim_loss_is_cross_entropy_on_the_masked_tokens() -> None:
    from benchmarks.vs_timm import PlainMim

    model = OmegaConf.structured(BeitConfig(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2))
    plain = PlainMim(model, vocab_size=10).eval()
    images, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2, 4))
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    x = plain.beit.patch_embed(images)
    x = torch.where(mask.unsqueeze(-1), plain.mask_token.expand_as(x), x)
    x = torch.cat([plain.beit.cls_token.expand(2, -1, -1), x], dim=1)
    for block in plain.beit.blocks:
        x = block(x)
    logits = plain.head(plain.beit.norm(x)[:, 1:])
    expected = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(plain(images, mask, targets), expected, atol=1e-6)
