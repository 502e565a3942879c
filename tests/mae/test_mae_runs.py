"""`python -m ssl_zoo.run method=mae` unchanged under every way of running it: one process, local DDP, DeepSpeed
ZeRO 1-3 (2 CPU processes over gloo, with an exact resume), and a real SLURM job. Each run is a child process."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import read_metrics
from tests.scale.conftest import run_zoo, slurm_partition  # noqa: F401  (the cluster fixture)

#: a 2-block ViT on a 4 x 4 grid of 8-px patches, 1-block decoder, 16 images per process and step; fp32 as
#: tests/scale/conftest.py says why
TINY_MAE = ["method=mae", "model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=2",
            "model.num_heads=2", "model.decoder_embed_dim=32", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "data.samples_per_epoch=256", "data.num_workers=0", "trainer.device=cpu", "trainer.batch_size=16",
            "trainer.log_every=1", "trainer.warmup_steps=2", "trainer.lr=3e-3", "trainer.betas=[0.9,0.95]",
            "trainer.eval_at_end=false", "trainer.precision=fp32"]


def losses(run: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.e2e
def test_one_process_trains_with_falling_loss_and_draws_the_reconstructions(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_zoo(*TINY_MAE, "trainer.max_steps=30", "trainer.eval_at_end=true", f"output_dir={out}")
    curve = losses(out)
    assert len(curve) == 30 and mean(curve[-5:]) < 0.9 * mean(curve[:5]), curve
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "mae" and str(out / "pictures" / "reconstructions.png") in summary["pictures"]
    assert Image.open(out / "pictures" / "reconstructions.png").size == (3 * 32 + 8, 8 * 32 + 18)
    assert "mask_token" not in load_file(out / "export" / "backbone.safetensors")
    assert "final_loss" in proc.stdout
    for key in ("knn_top1", "knn_random_init", "linear_top1", "linear_random_init"):  # the end-of-run score
        assert 0.0 <= summary[key] <= 1.0 and key in proc.stdout, key


@pytest.mark.e2e
def test_two_local_processes_train_with_ddp(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_zoo(*TINY_MAE, "trainer.max_steps=6", "launcher.nprocs=2", f"output_dir={out}")
    assert len(losses(out)) == 6 and (out / "checkpoints" / "step-00000006" / "rank-1.pt").exists()


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_and_stage_3_resumes_exactly(stage: int, tmp_path: Path) -> None:
    """Every stage trains and exports; stage 3 (parameters sharded, recomputation on) also resumes exactly."""
    args = [*TINY_MAE, "strategy=deepspeed", f"strategy.zero_stage={stage}", "launcher.nprocs=2",
            "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.keep_checkpoints=3",
            f"trainer.activation_checkpointing={stage == 3}"]
    full = tmp_path / "full"
    run_zoo(*args, f"output_dir={full}")
    assert json.loads((full / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage
    assert len(losses(full)) == 6 and (full / "export" / "backbone.safetensors").is_file()
    assert (full / "pictures" / "reconstructions.png").is_file()  # drawn on rank 0 from the gathered weights
    if stage != 3:
        return
    killed = tmp_path / "killed"
    shutil.copytree(full, killed, ignore=shutil.ignore_patterns("step-00000006", "export", "summary.json"))
    (killed / "checkpoints" / "last").write_text("step-00000003\n")
    assert "(step 3)" in run_zoo(*args, f"output_dir={killed}").stdout
    assert losses(killed) == losses(full)
    final_full, final_resumed = (load_file(r / "export" / "method.safetensors") for r in (full, killed))
    assert final_full.keys() == final_resumed.keys()
    assert all(torch.equal(final_full[k], final_resumed[k]) for k in final_full)


@pytest.mark.slurm
def test_two_task_slurm_job_trains(slurm_partition: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_zoo(*TINY_MAE, "trainer.max_steps=6", "launcher=slurm", f"launcher.partition={slurm_partition}",
            "launcher.tasks_per_node=2", "launcher.mem_gb=4", f"output_dir={out}", timeout=600)
    (attempt,) = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert attempt["world_size"] == 2 and attempt["outcome"] == "finished"
    assert json.loads((out / "summary.json").read_text())["steps"] == 6 and len(losses(out)) == 6
