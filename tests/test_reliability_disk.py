"""Disk trouble: a checkpoint write that fails leaves the previous checkpoint and the `last` pointer intact,
says so in one line, and stops the run instead of training on without a checkpoint."""
from __future__ import annotations

import contextlib
import errno
import io
from pathlib import Path

import torch

from ssl_zoo import run as run_cli
from ssl_zoo.engine.checkpoint import CheckpointManager
from tests.conftest import TOY, read_metrics

TINY_TOY = [*TOY, "trainer.device=cpu", "trainer.batch_size=8", "data.image_size=32", "data.samples_per_epoch=64",
            "data.num_workers=0", "trainer.log_every=1", "trainer.max_steps=8", "trainer.checkpoint_every=2",
            "trainer.keep_checkpoints=3"]


def main_output(argv: list[str]) -> tuple[int, str, list[str]]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = run_cli.main(argv)
    return code, out.getvalue(), err.getvalue().strip().splitlines()


def test_a_full_disk_at_a_checkpoint_keeps_the_previous_one_and_stops(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    code, _, lines = main_output([*TINY_TOY, f"output_dir={run}"])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: could not write the checkpoint of step 4") and "No space left" in lines[0]
    assert "step-00000002" in lines[0] and "intact" in lines[0]
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last", "step-00000002"]  # no partial step-4
    assert CheckpointManager(run).latest() == checkpoints / "step-00000002"
    assert max(r["step"] for r in read_metrics(run)) == 4  # stopped there, did not train on
    assert not (run / "summary.json").exists()

    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes from step 2
    code, out, lines = main_output([*TINY_TOY, f"output_dir={run}"])
    assert code == 0, lines
    assert "resuming from" in out and "(step 2)" in out and (run / "summary.json").exists()
