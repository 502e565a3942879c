"""Signals: SIGTERM or SIGUSR2 makes a run save a checkpoint after its step and exit cleanly, well within the
signal delay a scheduler gives (SLURM's default here: launcher.signal_delay_s=120); the same command resumes;
a second SIGTERM exits at once. (Under SLURM, USR2 requeues: tests/scale/test_slurm.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssl_zoo.launch.slurm import SlurmConfig
from tests.conftest import TOY, cli_env, read_metrics

pytestmark = pytest.mark.e2e
TINY_TOY = [*TOY, "trainer.device=cpu", "trainer.batch_size=8", "data.image_size=32", "data.samples_per_epoch=64",
            "data.num_workers=0", "trainer.log_every=1", "trainer.max_steps=60", "trainer.checkpoint_every=1000",
            "method.step_delay_s=0.1"]
#: what a stop may take at most: the time SLURM leaves between its warning signal and the kill
SIGNAL_DELAY_S = SlurmConfig.signal_delay_s


def start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ssl_zoo.run", *TINY_TOY, *extra, f"output_dir={run}"],
                            env=cli_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, run


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def logged(run: Path) -> int:
    return read_metrics(run)[-1]["step"] if (run / "metrics.jsonl").exists() and read_metrics(run) else 0


@pytest.mark.parametrize(("signum", "nprocs"), [(signal.SIGTERM, 1), (signal.SIGUSR2, 1), (signal.SIGTERM, 2)])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, signum: signal.Signals, nprocs: int) -> None:
    proc, run = start(tmp_path, f"launcher.nprocs={nprocs}")
    wait_for(lambda: logged(run) >= 3, proc)
    sent = time.time()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=SIGNAL_DELAY_S)
    took = time.time() - sent
    assert proc.returncode == 128 + signum and "Traceback" not in stderr, stderr[-3000:]
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1 and int(checkpoints[0].name.split("-")[1]) >= 3
    assert f"stopped by {signum.name} after saving {checkpoints[0]}" in stderr.splitlines()[-1]
    assert all((checkpoints[0] / f"rank-{r}.pt").is_file() for r in range(nprocs))
    assert took < SIGNAL_DELAY_S / 4, took
    again = subprocess.run([*proc.args[:-1], "trainer.max_steps=" + str(logged(run) + 2), proc.args[-1]],
                           env=cli_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"resuming from {checkpoints[0]}" in again.stdout, again.stderr[-3000:]


def test_a_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    proc, run = start(tmp_path, "method.save_delay_s=30")  # the checkpoint the first SIGTERM asks for is slow
    wait_for(lambda: logged(run) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: any((run / "checkpoints").glob(".tmp-step-*")), proc)  # it is being written
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert time.time() - sent < 10 and proc.returncode == 128 + signal.SIGTERM
    assert "received SIGTERM again: exiting now" in stderr and "Traceback" not in stderr
    assert not list((run / "checkpoints").glob("step-*"))  # the interrupted one never became a checkpoint


def test_a_sigterm_to_the_whole_process_group_stops_cleanly_with_loader_workers(tmp_path: Path) -> None:
    """`scancel`, `kill -- -PGID` and `docker stop` signal every process of the job, data-loading workers too: a
    worker must not die of it and take the step down with a traceback; the run saves its checkpoint as above."""
    run = tmp_path / "run"
    args = [o for o in TINY_TOY if not o.startswith("data.num_workers=")] + ["data.num_workers=2"]
    proc = subprocess.Popen([sys.executable, "-m", "ssl_zoo.run", *args, f"output_dir={run}"], env=cli_env(),
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(lambda: logged(run) >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=SIGNAL_DELAY_S)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM after saving" in stderr.splitlines()[-1]
    assert len(list((run / "checkpoints").glob("step-*"))) == 1



def test_training_ends_its_loader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers ignore SIGTERM (above), so training must end them itself, even while something still holds
    the loader: at exit, multiprocessing would SIGTERM them and then wait for them forever."""
    import multiprocessing

    import ssl_zoo.train as train_lib
    from ssl_zoo.config import load_config

    held = []
    make_loader = train_lib.make_loader
    monkeypatch.setattr(train_lib, "make_loader", lambda *a, **k: held.append(make_loader(*a, **k)) or held[-1])
    args = [o for o in TINY_TOY if not o.startswith(("data.num_workers=", "trainer.max_steps=", "method.step_delay"))]
    train_lib.train(load_config([*args, "data.num_workers=2", "trainer.max_steps=3", f"output_dir={tmp_path}"]))
    assert held and multiprocessing.active_children() == []
