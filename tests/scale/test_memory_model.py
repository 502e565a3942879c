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


def test_zero1_keeps_whole_gradients_zero2_and_3_their_partition() -> None:
    zero1, *others = (estimate(P, 0, 8, stage, VIT_L, 8, bf16=True, checkpointing=True) for stage in (1, 2, 3))
    assert zero1.whole_gradients == 4 * P and [e.gradients for e in others] == [4 * P / 8] * 2
    assert zero1.total == pytest.approx(zero1.model_states + zero1.buckets + 4 * P)  # more than the activations


def test_zero1_whole_gradients_and_activations_are_not_added() -> None:
    est = estimate(P, 0, 8, 1, VIT_L, 64, bf16=False, checkpointing=False)
    assert est.activations > est.whole_gradients > 0
    assert est.total == pytest.approx(est.model_states + est.buckets + est.activations)


def test_gradient_buckets_are_counted_whole_doubled_by_overlap_comm_under_zero_1_and_2() -> None:
    bucket = 3_000_000

    def buckets(stage: int, **zero: object) -> float:
        return estimate(P, 0, 8, stage, VIT_L, 8, bf16=True, checkpointing=True,
                        zero={"reduce_bucket_size": bucket, **zero}).buckets

    assert buckets(1) == buckets(2) == 4 * bucket  # DeepSpeed's default: no overlap_comm below stage 3
    assert buckets(2, overlap_comm=True) == 8 * bucket  # double buffering
    assert buckets(3) == 4 * bucket  # stage 3 (overlap_comm on by default) keeps one, allocated at start-up
    assert buckets(2, contiguous_gradients=False) == 0
    default = estimate(P, 0, 8, 2, VIT_L, 8, bf16=True, checkpointing=True)
    assert default.buckets == 4 * 500_000_000 and default.total > default.model_states + default.buckets


def test_zero3_keeps_parameters_gathered_within_the_reuse_distance() -> None:
    def weights(**zero: object) -> float:
        return estimate(P, 0, 8, 3, VIT_L, 8, bf16=True, checkpointing=True, zero=zero).weights

    assert weights() == 4 * P / 8 + 4 * P  # DeepSpeed's 1e9 reuse distance exceeds ViT-L's whole trace
    assert weights(stage3_max_reuse_distance=100_000_000) == 4 * P / 8 + 4 * 50_000_000
    assert weights(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=1_000) == 4 * P / 8 + 4 * 1_000
    assert weights(stage3_max_live_parameters=10_000_000) == 4 * P / 8 + 4 * 10_000_000
    offloaded = estimate(P, 0, 8, 3, VIT_L, 8, bf16=True, checkpointing=True, offload_params=True)
    assert offloaded.weights == 4 * P  # the partitions move to CPU memory, the gathered copies do not


def test_recomputation_keeps_block_inputs_only() -> None:
    plain = vit_activation_bytes(VIT_L, 32, bf16=True, checkpointing=False)
    recomputed = vit_activation_bytes(VIT_L, 32, bf16=True, checkpointing=True)
    assert recomputed < plain / 5
    assert vit_activation_bytes(OmegaConf.create({"hidden": 32}), 32, bf16=False, checkpointing=False) is None


def test_frozen_forward_and_activations_are_not_added() -> None:
    est = estimate(P, 10, 8, 2, VIT_L, 8, bf16=False, checkpointing=True, frozen_forward=1e12)
    assert est.total == pytest.approx(est.model_states + est.buckets + est.frozen + 1e12)


@pytest.mark.e2e
def test_dry_run_prints_the_model_beside_deepspeeds_estimator_and_what_fits() -> None:
    proc = run_zoo("experiment=peco_vit_large_slurm", "data.root=/data/imagenet/train", "launcher.partition=gpu",
                   "output_dir=/tmp/peco_vit_large_dry", "launcher.dry_run=true", "launcher.gpu_memory_gib=16",
                   "method.tokenizer.checkpoint=/shared/runs/peco_tok/export/method.safetensors")
    out = proc.stdout
    model_line = next(line for line in out.splitlines() if line.startswith("#   memory model:"))
    estimator_line = next(line for line in out.splitlines() if line.startswith("#   DeepSpeed's estimator:"))
    model_gib, estimator_gib = (float(line.split(":")[1].split("GiB")[0]) for line in (model_line, estimator_line))
    assert "DeepSpeed's buckets 1.863" in model_line  # ZeRO-2's 5e8-element reduce bucket, allocated whole
    assert model_gib > 303.1e6 * 4 / 2**30 > estimator_gib  # ViT-L's fp32 weights alone exceed the estimator's figure
    rows = [line for line in out.splitlines() if line.startswith("#   | 1 |") or line.startswith("#   | 3 |")]
    assert len(rows) == 4 and "what fits 16 GiB per GPU at global batch 2048" in out
    assert "*" in rows[-1] and not rows[0].endswith("* |")  # ZeRO-3 + recompute fits at 16 GiB; ZeRO-1's largest not


def test_benchmark_reads_the_peak_of_allocated_tensor_memory() -> None:
    import torch

    from benchmarks.memory_model import _allocated_peak

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.empty(3_000_000)  # 12 MB, never written: allocated all the same (as DeepSpeed's buckets)
        del a, b
        c = torch.ones(2_000_000)  # 8 MB: below the earlier peak
        del c
    assert _allocated_peak(prof) == 16_000_000


def test_benchmark_counts_blocks_freed_on_another_thread() -> None:
    """ZeRO-3's gloo collectives drop their buffers on gloo's threads; the peak must not keep them."""
    import threading

    import torch

    from benchmarks.memory_model import _allocated_peak, _count_every_thread

    def three_blocks_freed_elsewhere() -> float:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(3):
                box = [torch.ones(1_000_000)]  # 4 MB, its last reference dropped on another thread
                worker = threading.Thread(target=box.clear)
                worker.start()
                worker.join()
            torch.ones(500_000)  # 2 MB, after the three are gone
        return _allocated_peak(prof)

    with _count_every_thread():
        counted = three_blocks_freed_elsewhere()  # 4 MB over what the process held counted before
    # the profiler alone subtracts none of the three frees: 2 x 4 MB more, and 2 MB on top of the 12
    assert three_blocks_freed_elsewhere() - counted == 10_000_000
