"""The per-rank memory model (`ssl_zoo.engine.memory_model`) and what the dry run prints with it. Its
agreement with measured peaks is checked by `python -m benchmarks.memory_model` (benchmarks/RESULTS.md)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ssl_zoo.engine.memory_model import estimate, vit_activation_bytes
from tests.scale.conftest import run_zoo

VIT_L = OmegaConf.create({"embed_dim": 1024, "depth": 24, "num_heads": 16, "img_size": 224, "patch_size": 16,
                          "mlp_ratio": 4.0})
P = 303_000_000


def test_bf16_autocast_keeps_fp32_weights_whole_under_zero_1_and_2() -> None:
    for stage in (1, 2):
        est = estimate(P, 0, 32, stage, VIT_L, 64, bf16=True, checkpointing=False)
        assert est.weights == 4 * P  # what DeepSpeed's estimator (16-bit weights) misses
        assert est.total > est.model_states + est.activations * 0.99


def test_zero3_shards_weights_and_states_by_world_size() -> None:
    small, large = (estimate(P, 0, n, 3, VIT_L, 8, bf16=True, checkpointing=True) for n in (8, 64))
    assert large.master == small.master / 8 and large.optimizer == small.optimizer / 8
    assert large.weights < small.weights


def test_recomputation_keeps_block_inputs_only() -> None:
    plain = vit_activation_bytes(VIT_L, 32, bf16=True, checkpointing=False)
    recomputed = vit_activation_bytes(VIT_L, 32, bf16=True, checkpointing=True)
    assert recomputed < plain / 5
    assert vit_activation_bytes(OmegaConf.create({"hidden": 32}), 32, bf16=False, checkpointing=False) is None


def test_frozen_forward_and_activations_are_not_added() -> None:
    est = estimate(P, 10, 8, 2, VIT_L, 8, bf16=False, checkpointing=True, frozen_forward=1e12)
    assert est.total == pytest.approx(est.model_states + est.frozen + 1e12)


@pytest.mark.e2e
def test_dry_run_prints_the_model_beside_deepspeeds_estimator_and_what_fits() -> None:
    proc = run_zoo("experiment=peco_vit_large_slurm", "data.root=/data/imagenet/train", "launcher.partition=gpu",
                   "output_dir=/tmp/peco_vit_large_dry", "launcher.dry_run=true", "launcher.gpu_memory_gib=16",
                   "method.tokenizer.checkpoint=/shared/runs/peco_tok/export/method.safetensors")
    out = proc.stdout
    model_line = next(line for line in out.splitlines() if line.startswith("#   memory model:"))
    estimator_line = next(line for line in out.splitlines() if line.startswith("#   DeepSpeed's estimator:"))
    model_gib, estimator_gib = (float(line.split(":")[1].split("GiB")[0]) for line in (model_line, estimator_line))
    assert model_gib > 303.1e6 * 4 / 2**30 > estimator_gib  # ViT-L's fp32 weights alone exceed the estimator's figure
    rows = [line for line in out.splitlines() if line.startswith("#   | 1 |") or line.startswith("#   | 3 |")]
    assert len(rows) == 4 and "what fits 16 GiB per GPU at global batch 2048" in out
    assert "*" in rows[-1] and not rows[0].endswith("* |")  # ZeRO-3 + recompute fits at 16 GiB; ZeRO-1's largest not
