"""Untrusted weights: a file that would run code when unpickled is refused by every place that takes weights,
with one line naming the file, and its code never runs."""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ssl_zoo import export as export_cli
from ssl_zoo import run as run_cli
from ssl_zoo.config import load_config, to_yaml
from ssl_zoo.engine.checkpoint import CheckpointError, load_weights, safe_load
from tests.conftest import TOY, cli_env

TINY_TOY = [*TOY, "trainer.device=cpu", "trainer.batch_size=8", "data.image_size=32", "data.samples_per_epoch=64",
            "data.num_workers=0", "trainer.max_steps=4"]


class CodeOnLoad:
    """Unpickling this runs a shell command (it touches a marker file): any code a hostile file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def hostile(tmp_path: Path):
    """`write(path)` puts a hostile torch file at `path`; `ran()` tells whether any such file's code ran."""
    marker = tmp_path / "code-ran"

    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": {"weight": torch.zeros(2)}, "payload": CodeOnLoad(marker)}, path)
        return path

    write.ran = marker.exists  # type: ignore[attr-defined]
    return write


def main_output(main, argv: list[str]) -> tuple[int, list[str]]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue().strip().splitlines()


def assert_refused(code: int, lines: list[str], path: Path) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refusing to load" in lines[0], lines
    assert str(path) in lines[0] and "posix.system" in lines[0]


def test_the_loaders_refuse_pickled_code(hostile, tmp_path: Path) -> None:
    path = hostile(tmp_path / "weights.pt")
    for load in (safe_load, load_weights):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load(path)
    assert not hostile.ran()
    # plain weights still load, and the same file unpickled without the guard does run its code
    torch.save({"model": {"weight": torch.ones(2)}}, tmp_path / "plain.pt")
    assert torch.equal(load_weights(tmp_path / "plain.pt")["weight"], torch.ones(2))
    torch.load(path, weights_only=False)
    assert hostile.ran()


def test_a_file_that_is_no_weights_is_one_line(tmp_path: Path) -> None:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(CheckpointError, match="cannot read") as err:
        safe_load(text)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["method.tokenizer.checkpoint", "method.tokenizer_loss.perceptual.checkpoint"])
def test_tokenizer_and_perceptual_checkpoints_refuse_pickled_code(hostile, tmp_path: Path, key: str) -> None:
    path = hostile(tmp_path / "given.pt")
    method = "method=peco" if key.startswith("method.tokenizer.") else "method=peco_tokenizer"
    extra = [] if method == "method=peco" else ["method.tokenizer_loss.perceptual.network=timm_vit",
                                                 "method.tokenizer_loss.perceptual.timm_model=vit_tiny_patch16_224"]
    code, lines = main_output(run_cli.main, [method, *extra, f"{key}={path}", "trainer.device=cpu",
                                             f"output_dir={tmp_path / 'run'}"])
    assert_refused(code, lines, path)
    assert not hostile.ran()


def _hostile_checkpoint(hostile, run: Path, files: list[str]) -> Path:
    step = run / "checkpoints" / "step-00000002"
    for name in files:
        hostile(step / name)
    (run / "checkpoints" / "last").write_text(step.name + "\n")
    return step


@pytest.mark.parametrize("nprocs", [1, pytest.param(2, marks=pytest.mark.e2e)])
def test_resume_refuses_a_checkpoint_with_pickled_code(hostile, tmp_path: Path, nprocs: int) -> None:
    run = tmp_path / "run"
    step = _hostile_checkpoint(hostile, run, ["state.pt", "rank-0.pt", "rank-1.pt"])
    code, lines = main_output(run_cli.main, [*TINY_TOY, f"launcher.nprocs={nprocs}", f"output_dir={run}"])
    assert_refused(code, lines, step / "state.pt")
    assert not hostile.ran() and not (run / "summary.json").exists()


ZERO_FILES = ["zero/state/mp_rank_00_model_states.pt", "zero/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"]


@pytest.mark.deepspeed
def test_deepspeed_resume_checks_its_shards_before_deepspeed_unpickles_them(hostile, tmp_path: Path) -> None:
    run = tmp_path / "run"
    step = _hostile_checkpoint(hostile, run, [*ZERO_FILES, "rank-0.pt"])
    proc = subprocess.run([sys.executable, "-m", "ssl_zoo.run", *TINY_TOY, "strategy=deepspeed",
                           f"output_dir={run}"], env={**cli_env(), "DS_ACCELERATOR": "cpu"}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "refusing to load" in errors[0] and str(step / "zero") in errors[0], errors
    assert not hostile.ran()


@pytest.mark.parametrize("strategy", ["single", "deepspeed"])
def test_export_refuses_a_checkpoint_with_pickled_code(hostile, tmp_path: Path, monkeypatch, strategy: str) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run = tmp_path / "run"
    step = _hostile_checkpoint(hostile, run, ZERO_FILES if strategy == "deepspeed" else ["state.pt"])
    cfg = load_config([*TINY_TOY, f"strategy={strategy}", f"output_dir={run}"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    assert OmegaConf.load(run / "config.yaml").strategy.name == strategy
    code, lines = main_output(export_cli.main, [str(run)])
    assert_refused(code, lines, step)
    assert not hostile.ran()
