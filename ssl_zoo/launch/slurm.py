"""`launcher=slurm`: submit `train(cfg)` to SLURM through submitit, one task per GPU, and survive preemption.

One job per run (per stage of a multi-stage method: `ssl_zoo.run` calls the launcher stage after stage, and by
default waits for each job, because a stage needs the previous stage's export; a stage then gets its own
resources, log and requeue count, and a failed stage stops the chain before the next one spends anything).
With `wait=false` the command returns after submission; later stages then start `afterok` the earlier ones.

Preemption and time-out (SLURM sends USR2 `signal_delay_s` before the limit, or on preemption): submitit's
handler would call `checkpoint()` and requeue at once, in the middle of a step. Instead `TrainJob` parks that
handler behind a flag that `train` polls after every step; when it is raised, all ranks save a checkpoint
together, then rank 0 hands over to submitit's handler, which calls `checkpoint()` (a fresh copy of the job),
requeues and exits. The requeued job finds that checkpoint in `output_dir` and resumes at the next step.
Each attempt is recorded in `<output_dir>/attempts.jsonl` (job id, restart count, first and last step).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import sys
import time
import types
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf

from ssl_zoo.registry import LAUNCHERS
from ssl_zoo.schema import bad_value, checked


@dataclasses.dataclass
class SlurmConfig:
    name: str = "slurm"
    nodes: int = checked(1, ge=1)
    tasks_per_node: int = checked(1, ge=1)  # processes per node: one per GPU
    gpus_per_node: int = checked(0, ge=0)  # GPUs requested per node (0 on a CPU partition)
    cpus_per_task: int = checked(1, ge=1)
    mem_gb: float = checked(0, ge=0)  # memory per node; 0 leaves SLURM's default
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = checked(60, ge=1)  # time limit per attempt
    signal_delay_s: int = checked(120, ge=0)  # USR2 this long before the limit: the time a checkpoint has to be written
    max_timeouts: int = checked(3, ge=0)  # requeues after a time-out; requeues after preemption are not limited
    job_name: str = "ssl_zoo"
    folder: str = "${output_dir}/slurm"  # submitit's job files and logs
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun (module load ...)
    sweep: list[str] = dataclasses.field(default_factory=list)  # job array: one "k=v k=v" string per task
    array_parallelism: int = checked(32, ge=1)
    dry_run: bool = False  # print what would be submitted and exit
    gpu_memory_gib: float = checked(80.0, gt=0)  # per GPU: what the dry run checks the memory model against
    wait: bool = True  # wait for the job and return its summary

    @staticmethod
    def validate(section: DictConfig, root: DictConfig) -> None:
        if section.signal_delay_s >= section.time_min * 60:
            raise bad_value("launcher.signal_delay_s", section.signal_delay_s,
                            f"less than the time limit launcher.time_min x 60 = {section.time_min * 60} s")


#: the job id of the last submission in this process, for `afterok` chaining with wait=false
_last_job_id: Optional[str] = None


class DeferredSignal:
    """Replaces the handler of `signum` by one that only raises a flag, keeping the old handler to run later,
    at a point where stopping is safe (after a checkpoint). A handler must not start a collective checkpoint
    itself: it interrupts the main thread anywhere, possibly inside another collective."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signum = signum
        self.received = False
        self.original = signal.getsignal(signum)
        signal.signal(signum, self._raise_flag)

    def _raise_flag(self, signum: int, frame: Optional[types.FrameType]) -> None:
        print(f"received {signal.Signals(signum).name}: checkpointing after this step", flush=True)
        self.received = True

    def is_set(self) -> bool:
        return self.received

    def hand_over(self) -> None:
        """Run the original handler now (submitit's: checkpoint(), requeue, exit)."""
        if callable(self.original):
            self.original(self.signum, None)


def _checkpoint_step(output_dir: Path) -> int:
    from ssl_zoo.engine.checkpoint import CheckpointManager

    latest = CheckpointManager(output_dir).latest()
    return int(latest.name.split("-")[1]) if latest else 0


class TrainJob:
    """What submitit runs on every task: set the rank variables from the job environment, train, and on a
    preemption signal checkpoint then requeue. The resolved config travels as its argument, as plain data,
    so the same object serves `submit` and `map_array` (submitit passes the arguments to `checkpoint` too)."""

    def __call__(self, container: dict[str, Any]) -> dict[str, Any]:
        import submitit

        from ssl_zoo.config import from_container
        from ssl_zoo.train import Preempted, train

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        cfg = from_container(container)
        preemption = DeferredSignal(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG])
        out = Path(cfg.output_dir)
        attempt = {"job_id": submitit.JobEnvironment().job_id, "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0)),
                   "world_size": env.world_size, "first_step": _checkpoint_step(out)}
        try:
            summary = train(cfg, should_stop=preemption.is_set)
        except Preempted as stop:
            self._record(env.rank, out, {**attempt, "last_step": stop.step, "outcome": "preempted"})
            if env.rank == 0:
                preemption.hand_over()  # submitit: checkpoint() -> requeue -> exit
            return {"preempted_at_step": stop.step}
        self._record(env.rank, out, {**attempt, "last_step": cfg.trainer.max_steps, "outcome": "finished"})
        return summary

    @staticmethod
    def _record(rank: int, out: Path, attempt: dict[str, Any]) -> None:
        if rank == 0:
            with open(out / "attempts.jsonl", "a") as f:
                f.write(json.dumps(attempt) + "\n")

    def checkpoint(self, container: dict[str, Any]) -> Any:
        """submitit calls this on rank 0 when requeueing: the state is on disk, so a fresh copy resumes."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(), container)


def slurm_parameters(section: DictConfig) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for this launcher section."""
    params: dict[str, Any] = {
        "job_name": section.job_name, "nodes": section.nodes, "ntasks_per_node": section.tasks_per_node,
        "cpus_per_task": section.cpus_per_task, "time": section.time_min, "signal_delay_s": section.signal_delay_s,
        "setup": list(section.setup), "array_parallelism": section.array_parallelism,
    }
    optional = {"gpus_per_node": section.gpus_per_node or None, "mem": f"{section.mem_gb:g}GB" if section.mem_gb else None,
                "partition": section.partition, "account": section.account, "qos": section.qos,
                "constraint": section.constraint, "dependency": None if section.wait or not _last_job_id
                else f"afterok:{_last_job_id}"}
    return {**params, **{k: v for k, v in optional.items() if v is not None}}


def sweep_configs(section: DictConfig, cfg: DictConfig) -> list[DictConfig]:
    """One config per `sweep` entry (its `key=value` overrides on top of `cfg`, in `output_dir/sweep-<i>` unless
    the entry sets output_dir), or `[cfg]` without a sweep. Each result is validated again."""
    from ssl_zoo.config import ConfigError, from_container

    if not section.sweep:
        return [cfg]
    configs = []
    for i, entry in enumerate(section.sweep):
        task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
        task.output_dir = f"{cfg.output_dir}/sweep-{i}"
        task.launcher.sweep = []
        for item in shlex.split(entry):
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"launcher.sweep[{i}]: '{item}' is not key=value")
            OmegaConf.update(task, key, yaml.safe_load(value) if value else "", merge=False)
        configs.append(from_container(OmegaConf.to_container(task, resolve=True)))
    return configs


def describe(section: DictConfig, configs: list[DictConfig], params: dict[str, Any]) -> str:
    """What `dry_run` prints: the sbatch script submitit would write, and per task the DeepSpeed config and
    the memory estimate of the model states."""
    from submitit.slurm.slurm import _make_sbatch_string

    from ssl_zoo.engine.deepspeed_strategy import deepspeed_config, estimate_memory, memory_fit_table

    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(section.folder)}"
    world = section.nodes * section.tasks_per_node
    lines = [f"# dry run: {len(configs)} job(s) of {section.nodes} node(s) x {section.tasks_per_node} task(s) "
             f"= {world} processes; nothing submitted", "", "# sbatch script",
             _make_sbatch_string(command=command, folder=section.folder,
                                 map_count=len(configs) if section.sweep else None, **params).strip()]
    for i, cfg in enumerate(configs):
        trainer = cfg.trainer
        lines += ["", f"# task {i}: output_dir={cfg.output_dir} method={cfg.method.name} model={cfg.model.name}",
                  f"# global batch {trainer.batch_size} x {trainer.accumulate} accumulation x {world} processes "
                  f"= {trainer.batch_size * trainer.accumulate * world}; strategy={cfg.strategy.name}"]
        if cfg.strategy.name == "deepspeed":
            device = "cpu" if trainer.device == "cpu" or not section.gpus_per_node else "cuda"
            lines += ["# DeepSpeed config (saved as deepspeed_config.json in the run directory)",
                      json.dumps(deepspeed_config(trainer, cfg.strategy, world, device), indent=2)]
            est = estimate_memory(cfg, section.nodes, section.tasks_per_node)
            parts = est["model_parts_gib"]
            activations = "n/a (not a ViT model section)" if parts["activations"] is None else parts["activations"]
            lines += [f"# memory per GPU ({est['counted']}: {est['trainable_params'] / 1e6:.1f} M trainable + "
                      f"{est['frozen_params'] / 1e6:.1f} M frozen parameters), ZeRO-{est['zero_stage']}, micro-batch "
                      f"{trainer.batch_size}, recompute {'on' if trainer.activation_checkpointing else 'off'}:",
                      f"#   memory model: {est['model_gib_per_gpu']:.2f} GiB = weights {parts['weights']} + master "
                      f"{parts['master']} + gradients {parts['gradients']} + Adam {parts['optimizer']} + DeepSpeed's "
                      f"buckets {parts['buckets']} + frozen {parts['frozen']} + the largest of activations "
                      f"{activations}, the frozen forward {parts['frozen_forward']} and ZeRO-1's whole gradients "
                      f"{parts['whole_gradients']} (fp32 weights under bf16 autocast)",
                      f"#   DeepSpeed's estimator: {est['gpu_gib_per_gpu']:.2f} GiB per GPU, "
                      f"{est['cpu_gib_per_node']:.1f} GiB CPU per node (model states only, 16-bit weights assumed)",
                      f"# what fits {section.gpu_memory_gib:g} GiB per GPU at global batch "
                      f"{trainer.batch_size * trainer.accumulate * world} (memory model, GiB per GPU; * = fits):",
                      *(f"#   {row}" for row in memory_fit_table(cfg, est, world, section.gpu_memory_gib))]
    return "\n".join(lines)


def _follow_text(jobs: list[Any]) -> str:
    first = jobs[0]
    ids = ",".join(j.job_id for j in jobs)
    return "\n".join([f"submitted SLURM job {ids}" if len(jobs) == 1 else f"submitted SLURM job array {ids}",
                      f"  stdout: {first.paths.stdout}", f"  stderr: {first.paths.stderr}",
                      f"  follow: tail -f {first.paths.stdout}    status: squeue -j {first.job_id.split('_')[0]}  "
                      f"(history: sacct -j {first.job_id.split('_')[0]})"])


@LAUNCHERS.register("slurm", schema=SlurmConfig)
def launch_slurm(section: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    global _last_job_id
    import submitit

    configs = sweep_configs(section, cfg)
    params = slurm_parameters(section)
    if section.dry_run:
        print(describe(section, configs, params), flush=True)
        return {}
    executor = submitit.SlurmExecutor(folder=section.folder, max_num_timeout=section.max_timeouts)
    executor.update_parameters(**params)
    containers = [OmegaConf.to_container(c, resolve=True) for c in configs]
    if section.sweep:
        jobs = executor.map_array(TrainJob(), containers)
    else:
        jobs = [executor.submit(TrainJob(), containers[0])]
    _last_job_id = jobs[0].job_id.split("_")[0]
    print(_follow_text(jobs), flush=True)
    if not section.wait:
        return {"job_id": _last_job_id, "stdout": str(jobs[0].paths.stdout)}
    results = [_wait(job) for job in jobs]
    return results[0] if len(results) == 1 else {"job_id": _last_job_id, "tasks": results}


def _wait(job: Any, poll_s: float = 5.0) -> dict[str, Any]:
    """Wait for the job, printing its state changes; rank 0's summary, or raise with the failed task's error."""
    state = None
    while not job.done():
        if job.state != state:
            state = job.state
            print(f"job {job.job_id}: {state}", flush=True)
        time.sleep(poll_s)
    return job.results()[0]  # rank 0's summary (results() also works for multi-task jobs)
