"""Kill at any moment: SIGKILL a tiny run (its whole process group) at random steps and while a checkpoint is
being written, rerun the same command each time, and end with the weights of an uninterrupted run, exactly.
Between kills, every `step-*` directory is a complete checkpoint: a partial one is never there to be loaded."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssl_zoo.engine.checkpoint import CheckpointManager, safe_load
from tests.conftest import TOY, cli_env, read_metrics

MAX_STEPS = 12
TINY_TOY = [*TOY, "trainer.device=cpu", "trainer.batch_size=8", "data.image_size=32", "data.samples_per_epoch=64",
            "data.num_workers=0", "trainer.log_every=1", f"trainer.max_steps={MAX_STEPS}",
            "trainer.checkpoint_every=3", "trainer.keep_checkpoints=2", "method.step_delay_s=0.05",
            "method.save_delay_s=0.5"]


def command(extra: list[str], out: Path) -> list[str]:
    return [sys.executable, "-m", "ssl_zoo.run", *TINY_TOY, *extra, f"output_dir={out}"]


def env() -> dict[str, str]:
    return {**cli_env(), "DS_ACCELERATOR": "cpu"}


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def last_logged_step(run: Path, since: float) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.exists() or metrics.stat().st_mtime < since:
        return -1
    rows = read_metrics(run)
    return rows[-1]["step"] if rows else -1


def kill_once(cmd: list[str], run: Path, moment: tuple, log: Path) -> None:
    """Start the command and SIGKILL its process group at `moment`: ("write",) while a checkpoint is being
    written, or ("step", k, delay) `delay` seconds after step k is logged."""
    started = time.time()
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env(), stdout=out, stderr=out, start_new_session=True)
    try:
        if moment[0] == "write":
            wait_for(lambda: any((run / "checkpoints").glob(".tmp-step-*")), proc, "a checkpoint write")
        else:
            wait_for(lambda: last_logged_step(run, started) >= moment[1], proc, f"step {moment[1]}")
            time.sleep(moment[2])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def assert_only_complete_checkpoints(run: Path, world: int) -> None:
    for step in sorted((run / "checkpoints").glob("step-*")):
        for rank in range(world):
            safe_load(step / f"rank-{rank}.pt")
        zero = step / "zero" / "state"
        if zero.is_dir():
            assert (zero / "mp_rank_00_model_states.pt").is_file(), step
            assert len(list(zero.glob("*optim_states.pt"))) == world, step
        else:
            safe_load(step / "state.pt")
    latest = CheckpointManager(run).latest()
    assert latest is None or latest.name.startswith("step-")


def kill_and_resume(tmp_path: Path, extra: list[str], world: int, kills: int, seed: int) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(extra, straight), env=env(), check=True, capture_output=True, timeout=600)
    rng = random.Random(seed)
    log = tmp_path / "killed.log"
    # first past the first checkpoint (step 3 is saved before step 4 runs), so that the next attempt resumes;
    # then while the next checkpoint is written; then anywhere
    moments = [("step", rng.randrange(4, MAX_STEPS - 1), rng.uniform(0, 0.1)), ("write",)]
    moments += [("step", rng.randrange(1, MAX_STEPS), rng.uniform(0, 0.1)) for _ in range(kills - 2)]
    for moment in moments:
        latest = CheckpointManager(killed).latest()
        resumed_at = int(latest.name.split("-")[1]) if latest else 0
        if moment[0] == "step" and moment[1] <= resumed_at:  # a step this attempt will run again
            moment = ("step", rng.randrange(resumed_at + 1, MAX_STEPS), moment[2])
        kill_once(command(extra, killed), killed, moment, log)
        assert not (killed / "summary.json").exists(), f"killed at {moment} after the end"
        assert_only_complete_checkpoints(killed, world)
    final = subprocess.run(command(extra, killed), env=env(), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming from" in final.stdout
    want, got = (load_file(r / "export" / "method.safetensors") for r in (straight, killed))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.e2e
def test_single_process_survives_kills(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, [], world=1, kills=3, seed=0)


@pytest.mark.e2e
def test_two_process_ddp_survives_kills(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, ["launcher.nprocs=2"], world=2, kills=2, seed=1)


@pytest.mark.deepspeed
def test_zero2_survives_kills(tmp_path: Path) -> None:
    kill_and_resume(tmp_path, ["launcher.nprocs=2", "strategy=deepspeed", "strategy.zero_stage=2"],
                    world=2, kills=2, seed=2)
