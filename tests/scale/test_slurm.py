"""`launcher=slurm` against a real one-node SLURM cluster: a run, a 2-task DDP job, a preempted job's requeue."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.scale.conftest import TINY_PECO, TOY, run_zoo

pytestmark = pytest.mark.slurm


def _slurm(tmp_path: Path, partition: str, *extra: str) -> list[str]:
    return [*TOY, "launcher=slurm", f"launcher.partition={partition}", "launcher.mem_gb=4",
            f"output_dir={tmp_path / 'run'}", *extra]


def _attempts(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "attempts.jsonl").read_text().splitlines()]


def test_peco_main_job_completes_through_slurm(slurm_partition: str, tmp_path: Path) -> None:
    """Both PeCo stages (tokenizer, then masked image modelling), each a SLURM job, at a tiny size."""
    out = tmp_path / "run"
    proc = run_zoo(*TINY_PECO, "trainer.max_steps=12", "launcher=slurm", f"launcher.partition={slurm_partition}",
                   "launcher.mem_gb=4", f"output_dir={out}", timeout=600)
    assert proc.stdout.count("submitted SLURM job") == 2 and "tail -f" in proc.stdout
    tokenizer, mim = out / "tokenizer", out / "mim"
    assert json.loads((tokenizer / "summary.json").read_text())["codebook_usage"] > 0
    summary = json.loads((mim / "summary.json").read_text())
    assert summary["steps"] == 12 and (mim / "export" / "backbone.safetensors").is_file()
    assert "final_mim_accuracy" in summary
    losses = [json.loads(line)["loss"] for line in (mim / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    for stage in (tokenizer, mim):
        assert [a["outcome"] for a in _attempts(stage)] == ["finished"]


def test_two_task_job_trains_with_ddp(slurm_partition: str, tmp_path: Path) -> None:
    run_zoo(*_slurm(tmp_path, slurm_partition, "launcher.tasks_per_node=2", "trainer.max_steps=8"))
    run = tmp_path / "run"
    (attempt,) = _attempts(run)
    assert attempt["world_size"] == 2 and attempt["outcome"] == "finished"
    logs = sorted((run / "slurm").glob("*_log.out"))
    assert len(logs) == 2  # one log per task: both ranks ran
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_preempted_job_requeues_and_resumes_from_its_checkpoint(slurm_partition: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_zoo(*_slurm(tmp_path, slurm_partition, "launcher.tasks_per_node=2", "launcher.wait=false",
                           "method.step_delay_s=0.4", "trainer.max_steps=30", "trainer.checkpoint_every=100"))
    job_id = next(line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("submitted SLURM job"))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 6):
        assert time.time() < deadline, "the job did not start training"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what SLURM sends on preemption
    deadline = time.time() + 300
    while not (run / "summary.json").exists():
        assert time.time() < deadline, "the job did not finish after the requeue"
        time.sleep(1)
    first, second = _attempts(run)
    assert first["outcome"] == "preempted" and first["restart"] == 0 and 6 <= first["last_step"] < 30
    assert second["outcome"] == "finished" and second["restart"] == 1
    assert second["first_step"] == first["last_step"]  # resumed from the checkpoint written on the signal
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 31))
    # the log of each attempt: the second ran only the steps after the checkpoint, none before it again
    log = (run / "slurm" / f"{job_id}_0_log.out").read_text()
    checkpoint = run / "checkpoints" / f"step-{first['last_step']:08d}"
    assert f"resuming from {checkpoint}" in log
    attempt_logs = log.split("resuming from")
    ran_before = [int(line.split()[1].rstrip(":")) for line in attempt_logs[0].splitlines() if line.startswith("step ")]
    ran_after = [int(line.split()[1].rstrip(":")) for line in attempt_logs[1].splitlines() if line.startswith("step ")]
    assert ran_before == list(range(1, first["last_step"] + 1))
    assert ran_after == list(range(first["last_step"] + 1, 31))
    assert json.loads((run / "summary.json").read_text())["resumed_from"] == str(checkpoint)


def _submitted(stdout: str) -> list[str]:
    return [line.split()[-1] for line in stdout.splitlines() if line.startswith("submitted SLURM job")]


def _sacct(job_id: str, fields: str) -> list[list[str]]:
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, f"--format={fields}"], capture_output=True,
                         text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines() if line.strip()]


def test_sweep_runs_as_a_two_entry_job_array(slurm_partition: str, tmp_path: Path) -> None:
    """`launcher.sweep` with two entries: one SLURM job array, each task its own run directory and setting."""
    proc = run_zoo(*_slurm(tmp_path, slurm_partition, "trainer.max_steps=4",
                           'launcher.sweep=["trainer.lr=0.001","trainer.lr=0.003 trainer.max_steps=5"]'))
    assert "submitted SLURM job array" in proc.stdout
    array_id = _submitted(proc.stdout)[0].split(",")[0].split("_")[0]
    tasks = _sacct(array_id, "JobID,State")
    assert sorted(t[0] for t in tasks) == [f"{array_id}_0", f"{array_id}_1"] and {t[1] for t in tasks} == {"COMPLETED"}
    for i, (lr, steps) in enumerate([(0.001, 4), (0.003, 5)]):
        run = tmp_path / "run" / f"sweep-{i}"
        assert json.loads((run / "summary.json").read_text())["steps"] == steps
        assert f"lr: {lr}" in (run / "config.yaml").read_text()


def test_wait_false_chains_stage_two_after_stage_one(slurm_partition: str, tmp_path: Path) -> None:
    """`launcher.wait=false` on the two-stage main job: both stages are submitted at once and the command
    returns; stage 2 waits `afterok` on stage 1 in SLURM's queue, then trains on stage 1's export."""
    out = tmp_path / "run"
    started = time.time()
    proc = run_zoo(*TINY_PECO, "trainer.max_steps=3", "method.tokenizer_training.max_steps=3", "launcher=slurm",
                   f"launcher.partition={slurm_partition}", "launcher.mem_gb=4", "launcher.wait=false",
                   f"output_dir={out}")
    first, second = _submitted(proc.stdout)
    dependency = subprocess.run(["scontrol", "show", "job", second], capture_output=True, text=True).stdout
    assert f"afterok:{first}" in dependency  # (scontrol reports the dependency while stage 2 is pending)
    assert not (out / "tokenizer" / "summary.json").exists()  # returned before stage 1 finished
    deadline = started + 600
    while not (out / "mim" / "summary.json").exists():
        assert time.time() < deadline, "the chained stage 2 did not finish"
        time.sleep(2)
    (end_first,), (start_second,) = _sacct(first, "End")[0:1], _sacct(second, "Start")[0:1]
    assert end_first <= start_second  # ISO timestamps: stage 2 started once stage 1 had ended
    assert json.loads((out / "mim" / "summary.json").read_text())["steps"] == 3
