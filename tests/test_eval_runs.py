"""Evaluation from real pretraining runs (a tiny two-stage PeCo through the CLI): every protocol from the run
directory and from random init, the main job's score, the online kNN monitor, and the timm export round trip
for a single-process and a ZeRO-3 run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssl_zoo.eval import main as eval_main
from tests.scale.conftest import REPO, TINY_PECO, child_env, run_zoo

SMALL_CROPS = ["data.train_crops_per_photo=6", "data.test_crops_per_photo=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, str]:
    """The tiny PeCo main job (tokenizer 3 steps, MIM 4 steps, kNN monitor every 2 steps); its stdout."""
    out = tmp_path_factory.mktemp("tiny_peco") / "run"
    proc = run_zoo(*TINY_PECO, "trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_at_end=true",
                   f"output_dir={out}", timeout=900)
    return out, proc.stdout


def _features_equal_after_timm_round_trip(stage: Path, timm_dir: Path) -> float:
    import timm

    from ssl_zoo.config import from_container
    from ssl_zoo.engine.checkpoint import load_weights
    from ssl_zoo.registry import METHODS

    cfg = from_container(OmegaConf.to_container(OmegaConf.load(stage / "config.yaml"), resolve=True))
    method = METHODS.get(cfg.method.name)(cfg)
    method.load_state_dict(load_weights(stage / "export" / "method.safetensors"))
    loaded = timm.create_model(f"local-dir:{timm_dir}", pretrained=True, num_classes=7).eval()
    assert loaded.get_classifier().out_features == 7
    assert tuple(loaded.pretrained_cfg["input_size"]) == (3, cfg.model.img_size, cfg.model.img_size)
    images = torch.randn(3, 3, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = method.eval().extract_features(images)
        theirs = loaded.forward_head(loaded.forward_features(images), pre_logits=True)
    return float((ours - theirs).abs().max())


def _export_timm(*args: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "ssl_zoo.export", *args, "--format", "timm"], cwd=REPO,
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert [Path(p).name for p in written] == ["config.json", "model.safetensors"], proc.stdout[-2000:]
    return Path(written[0]).parent


def test_main_job_prints_its_score_beside_random_init(tiny_run):
    run, stdout = tiny_run
    summary = json.loads((run / "summary.json").read_text())[-1]
    for key in ("knn_top1", "knn_random_init", "linear_top1", "linear_random_init"):
        assert 0.0 <= summary[key] <= 1.0 and key in stdout, key
    assert json.loads((run / "mim" / "summary.json").read_text())["knn_top1"] == summary["knn_top1"]


def test_eval_every_logs_knn_to_metrics_and_tensorboard(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mim = tiny_run[0] / "mim"
    rows = [json.loads(line) for line in (mim / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_knn_top1" in r] == [2, 4]
    events = EventAccumulator(str(mim / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/eval_knn_top1")] == [2, 4]


@pytest.mark.parametrize("protocol", ["knn", "linear", "finetune"])
def test_each_protocol_runs_from_the_run_and_from_random_init(protocol, tiny_run, tmp_path, capsys):
    run = tiny_run[0]
    extra = ["trainer.max_steps=4", "trainer.batch_size=8", "trainer.checkpoint_every=2"] \
        if protocol == "finetune" else ["protocol.epochs=20"] if protocol == "linear" else []
    for checkpoint in (str(run), "random"):
        out = tmp_path / checkpoint.replace("/", "_")
        args = [f"checkpoint={checkpoint}", f"architecture={run}", f"protocol={protocol}", f"output_dir={out}",
                "trainer.device=cpu", *SMALL_CROPS, *extra]
        assert eval_main(args) == 0, capsys.readouterr().err
        record = json.loads((out / "eval.json").read_text())
        assert record["protocol"] == protocol and record["data"] == "crop_id" and record["seed"] == 0
        assert 0.0 <= record["score"] <= 1.0 and record["wall_time_s"] > 0
        assert record["checkpoint"] == ("random init" if checkpoint == "random" else str(run / "mim"))
        assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()
        if protocol != "finetune" and checkpoint != "random":
            assert 0.0 <= record["random_init_score"] <= 1.0  # the baseline beside the score
        printed = capsys.readouterr().out
        assert f"== {protocol} on crop_id" in printed and f"{record['score']:.4f}" in printed
    if protocol == "finetune":  # the same command again resumes the finished run instead of retraining
        assert eval_main(args) == 0
        assert "resuming from" in capsys.readouterr().out


def test_timm_export_round_trip_single_process(tiny_run):
    stage = tiny_run[0] / "mim"
    timm_dir = _export_timm(str(tiny_run[0]))
    assert timm_dir == stage / "export" / "timm"
    config = json.loads((timm_dir / "config.json").read_text())
    assert config["architecture"].startswith("beit") and config["num_classes"] == 0
    assert {"input_size", "mean", "std"} <= config["pretrained_cfg"].keys() and config["model_args"]["depth"] == 2
    assert _features_equal_after_timm_round_trip(stage, timm_dir) < 1e-5


@pytest.mark.deepspeed
def test_timm_export_round_trip_zero3(tiny_run, tmp_path):
    """A ZeRO-3 run on 2 processes, exported from its sharded checkpoint without DeepSpeed's runtime."""
    tokenizer = tiny_run[0] / "tokenizer" / "export" / "method.safetensors"
    out = tmp_path / "zero3"
    run_zoo(*TINY_PECO, f"method.tokenizer.checkpoint={tokenizer}", "strategy=deepspeed",
            "strategy.zero_stage=3", "launcher.nprocs=2", "trainer.max_steps=2", f"output_dir={out}")
    timm_dir = _export_timm(str(out), "--checkpoint", str(out / "checkpoints" / "step-00000002"))
    assert _features_equal_after_timm_round_trip(out, timm_dir) < 1e-5
