"""The core trains a method it knows only through the plugin mechanism, resumes exactly, and runs DDP."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ssl_zoo.engine.logger import TIMING_KEYS
from tests.conftest import TOY, cli_env, read_metrics

pytestmark = pytest.mark.e2e
FAST = ["trainer.batch_size=16", "trainer.log_every=5", "trainer.warmup_steps=5", "data.num_workers=1"]


def reproducible(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_plugin_method_trains_with_falling_loss(cli, tmp_path):
    proc = cli(*TOY, *FAST, "trainer.max_steps=60", "output_dir=run", cwd=tmp_path)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(5, 65, 5))
    assert rows[-1]["loss"] < 0.7 * rows[0]["loss"]
    run = tmp_path / "run"
    for path in ("config.yaml", "summary.json", "export/method.safetensors", "export/backbone.safetensors",
                 "checkpoints/last", "checkpoints/step-00000060/state.pt"):
        assert (run / path).exists(), path
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert "final_loss" in proc.stdout


def test_entry_point_plugin_trains(cli, tmp_path):
    """A distribution that declares the toy plugin under the `ssl_zoo.plugins` entry-point group."""
    site = tmp_path / "site"
    info = site / "toy_plugin_dist-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin-dist\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ssl_zoo.plugins]\ntoy = tests.plugins.toy_method\n")
    cli("method=toy_autoencoder", "model=toy_mlp", *FAST, "trainer.max_steps=20", "output_dir=run",
        cwd=tmp_path, extra_path=site)
    rows = read_metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_sigkill_then_same_command_resumes_exactly(cli, tmp_path):
    common = [*TOY, *FAST, "trainer.max_steps=40", "trainer.checkpoint_every=10", "trainer.keep_checkpoints=5"]
    cli(*common, "output_dir=straight", cwd=tmp_path)

    args = [sys.executable, "-m", "ssl_zoo.run", *common, "output_dir=killed", "method.step_delay_s=0.05"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = tmp_path / "killed/checkpoints/step-00000020"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), proc.stderr.read().decode()[-3000:] if proc.poll() is not None else "timeout"
    time.sleep(0.4)  # die part way to the next checkpoint, with metrics past this one already logged
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed/summary.json").exists()
    logged_before = [r["step"] for r in read_metrics(tmp_path / "killed")]

    out = cli(*common, "output_dir=killed", "method.step_delay_s=0.05", cwd=tmp_path).stdout
    assert "resuming from" in out and ("(step 20)" in out or "(step 30)" in out)
    resumed = reproducible(read_metrics(tmp_path / "killed"))
    straight = reproducible(read_metrics(tmp_path / "straight"))
    assert max(logged_before) >= 20
    assert resumed == straight


def test_two_local_processes_train_with_ddp(cli, tmp_path):
    cli(*TOY, *FAST, "trainer.max_steps=30", "launcher.nprocs=2", "output_dir=ddp", cwd=tmp_path)
    rows = read_metrics(tmp_path / "ddp")
    assert rows[-1]["loss"] < rows[0]["loss"]
    # a global batch is 2 x 16 images: one data epoch of 1024 samples is 32 steps
    assert (tmp_path / "ddp/checkpoints/step-00000030/rank-1.pt").exists()


def test_corrupt_images_are_skipped_and_counted(cli, tmp_path):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    for i in range(20):
        Image.new("RGB", (48, 40), (i * 12, 100, 200 - i * 9)).save(images / f"img{i}.png")
    (images / "nested" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (images / "truncated.png").write_bytes((images / "img0.png").read_bytes()[:40])
    proc = cli(*TOY, "data=flat_folder", f"data.root={images}", "data.image_size=32", "data.num_workers=0",
               "trainer.batch_size=22", "trainer.max_steps=4", "trainer.log_every=2", "output_dir=run", cwd=tmp_path)
    rows = read_metrics(tmp_path / "run")
    assert sum(r.get("skipped_images", 0) for r in rows) >= 2
    assert "broken.jpg" in proc.stderr and "truncated.png" in proc.stderr
