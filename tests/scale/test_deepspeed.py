"""DeepSpeed ZeRO 1, 2 and 3 on CPU, 2 processes over gloo: training, exact resume, consolidated export, and
the settings it refuses."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ssl_zoo.config import TrainerConfig
from ssl_zoo.engine.deepspeed_strategy import DeepSpeedConfig, deepspeed_config
from tests.scale.conftest import REPO, TINY_PECO, TOY, child_env, run_zoo

pytestmark = pytest.mark.deepspeed


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]  # training rows (not the end-of-run evaluation's)


def _optimizer_states(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's ZeRO optimiser shard, by file and path."""
    found: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if torch.is_tensor(value):
            found[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{prefix}/{i}", v)

    for path in sorted((checkpoint / "zero" / "state").glob("*optim_states.pt")):
        walk(path.name, torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"])
    assert found, f"no optimiser shards in {checkpoint}"
    return found


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_trains_resumes_exactly_and_exports(stage: int, tmp_path: Path, tiny_tokenizer: Path) -> None:
    args = [*TINY_PECO, f"method.tokenizer.checkpoint={tiny_tokenizer}", "strategy=deepspeed", f"strategy.zero_stage={stage}", "launcher.nprocs=2",
            "trainer.max_steps=10", "trainer.checkpoint_every=5", "trainer.keep_checkpoints=3", "trainer.lr=1e-2",
            f"trainer.activation_checkpointing={stage == 3}"]  # as the ViT-H recipe runs: ZeRO-3 with recomputation
    full = tmp_path / "full"
    run_zoo(*args, f"output_dir={full}")
    losses = _losses(full)
    assert len(losses) == 10 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    ds_config = json.loads((full / "deepspeed_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["train_batch_size"] == 16

    # a run killed after the checkpoint of step 5: same command, resumes there and ends where `full` ended
    killed = tmp_path / "killed"
    shutil.copytree(full, killed, ignore=shutil.ignore_patterns("step-00000010", "export", "summary.json"))
    (killed / "checkpoints" / "last").write_text("step-00000005\n")
    proc = run_zoo(*args, f"output_dir={killed}")
    assert "resuming from" in proc.stdout and "(step 5)" in proc.stdout
    final_full, final_resumed = (load_file(r / "export" / "method.safetensors") for r in (full, killed))
    assert final_full.keys() == final_resumed.keys()
    for key in final_full:
        assert torch.equal(final_full[key], final_resumed[key]), key
    states = [_optimizer_states(r / "checkpoints" / "step-00000010") for r in (full, killed)]
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    assert _losses(killed) == _losses(full)  # the same losses after the resume, step for step

    # the consolidated export of the checkpoint, read without DeepSpeed's runtime, equals the gathered live weights
    exported = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "ssl_zoo.export", str(full), "--out", str(exported)], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline = load_file(exported / "method.safetensors")
    assert offline.keys() == final_full.keys()
    for key in offline:
        assert torch.equal(offline[key], final_full[key]), key


@pytest.mark.parametrize(("trainer_keys", "strategy_keys", "message"), [
    ({}, {"zero_stage": 4}, "strategy.zero_stage must be 1, 2 or 3"),
    ({}, {"zero_stage": 2, "offload_params": True}, "offload_params needs strategy.zero_stage=3"),
    ({"visualize_every": 10}, {"zero_stage": 3}, "set trainer.visualize_every=0"),
])
def test_settings_deepspeed_cannot_honour_are_refused_with_the_fix(trainer_keys: dict, strategy_keys: dict,
                                                                  message: str) -> None:
    trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), trainer_keys)
    strategy = OmegaConf.merge(OmegaConf.structured(DeepSpeedConfig), strategy_keys)
    with pytest.raises(ValueError, match=message):
        deepspeed_config(trainer, strategy, world_size=2, device_type="cpu")
    defaults = OmegaConf.structured(TrainerConfig), OmegaConf.structured(DeepSpeedConfig)
    assert deepspeed_config(*defaults, 2, "cpu")["zero_optimization"]["stage"] == 2


#: the paper's codebook size (8192 x 256), for the ZeRO-3 case: large enough that ZeRO-3 would partition it
PAPER_CODEBOOK = ["method.tokenizer.quantizer.num_codes=8192", "method.tokenizer.quantizer.dim=256"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_two_stage_peco_trains_under_zero_from_one_command(stage: int, tmp_path: Path) -> None:
    """`method=peco` without a tokenizer: stage 1 (k-means init, dead-code restarts, the GAN from its 2nd step)
    then stage 2 on its export, both under ZeRO on 2 processes; the tokenizer keeps every code restartable."""
    codebook = PAPER_CODEBOOK if stage == 3 else []
    run_zoo(*TINY_PECO, *codebook, "method.tokenizer_training.max_steps=3", "method.tokenizer_loss.gan.start_step=1",
            "method.tokenizer.quantizer.dead_after_steps=1", "trainer.max_steps=2", "strategy=deepspeed",
            f"strategy.zero_stage={stage}", "launcher.nprocs=2", f"output_dir={tmp_path}", timeout=900)
    tokenizer = json.loads((tmp_path / "tokenizer" / "summary.json").read_text())
    assert tokenizer["codebook_size"] == (8192 if stage == 3 else 64) and tokenizer["codebook_usage"] > 0
    rows = [json.loads(line) for line in (tmp_path / "tokenizer" / "metrics.jsonl").read_text().splitlines()]
    assert "loss_g" in [row for row in rows if "loss" in row][-1]  # GAN ran (the held-out row comes after it)
    export = load_file(tmp_path / "tokenizer" / "export" / "method.safetensors")
    codebook_tensor = export["tokenizer.quantizer.codebook"]
    assert codebook_tensor.shape == ((8192, 256) if stage == 3 else (64, 32))
    assert torch.isfinite(codebook_tensor).all() and bool(export["tokenizer.quantizer.initialised"])  # k-means ran
    mim = json.loads((tmp_path / "mim" / "summary.json").read_text())
    assert mim["steps"] == 2 and "final_mim_accuracy" in mim
    assert json.loads((tmp_path / "mim" / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == stage


def test_tokenizer_stage_resumes_exactly_under_zero3(tmp_path: Path) -> None:
    """Stage 1 under ZeRO-3 killed after its step-3 checkpoint: the rerun continues with the same losses and
    ends with the same weights, codebook statistics and optimiser shards as the uninterrupted run."""
    args = ["method=peco_tokenizer", *[o for o in TINY_PECO if o != "method=peco"], "trainer.max_steps=6",
            "trainer.checkpoint_every=3", "trainer.lr=1e-3", "method.tokenizer_loss.gan.start_step=2",
            "method.tokenizer.quantizer.dead_after_steps=1", "strategy=deepspeed", "strategy.zero_stage=3",
            "launcher.nprocs=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_zoo(*args, f"output_dir={full}", timeout=900)
    shutil.copytree(full, killed, ignore=shutil.ignore_patterns("step-00000006", "export", "summary.json"))
    (killed / "checkpoints" / "last").write_text("step-00000003\n")
    proc = run_zoo(*args, f"output_dir={killed}", timeout=900)
    assert "(step 3)" in proc.stdout
    assert _losses(killed) == _losses(full)
    weights = [load_file(r / "export" / "method.safetensors") for r in (full, killed)]
    assert weights[0].keys() == weights[1].keys() and "tokenizer.quantizer.ema_count" in weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    states = [_optimizer_states(r / "checkpoints" / "step-00000006") for r in (full, killed)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_optimizer_offload_trains_as_the_on_device_optimizer_does(tmp_path: Path) -> None:
    """`strategy.offload_optimizer=true`: DeepSpeed's CPU Adam (built just in time on first use) holds the
    optimiser states and takes the step; it is AdamW, so the losses follow the non-offloaded run's."""
    args = [*TOY, "strategy=deepspeed", "strategy.zero_stage=2", "launcher.nprocs=2", "trainer.max_steps=6"]
    run_zoo(*args, "strategy.offload_optimizer=true", f"output_dir={tmp_path / 'offload'}", timeout=1200)  # + the cpu_adam build
    run_zoo(*args, f"output_dir={tmp_path / 'device'}")
    config = json.loads((tmp_path / "offload" / "deepspeed_config.json").read_text())
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    offloaded, on_device = _losses(tmp_path / "offload"), _losses(tmp_path / "device")
    assert len(offloaded) == 6 and offloaded[-1] < offloaded[0]
    assert offloaded == pytest.approx(on_device, rel=1e-4)
