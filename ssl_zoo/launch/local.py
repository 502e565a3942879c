"""The local launcher: train in this process, or in `nprocs` local processes joined for DDP.

Every launcher is a registered callable `(launcher_section, cfg) -> summary`; the SLURM one submits the
same `train(cfg)` through submitit instead.

Stopping: SIGTERM or SIGUSR2 (a user's `kill`, a job manager, `docker stop`) stops the run cleanly: every rank
finishes its step, they save a checkpoint together, and the command exits with 128 + the signal's number after
naming that checkpoint; the same command then resumes from it. A second SIGTERM exits at once, keeping the last
complete checkpoint. With nprocs > 1 this process takes the signals and tells the ranks through an event.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import types
from pathlib import Path
from typing import Any, Callable, Optional

import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from ssl_zoo.engine import distributed as dist
from ssl_zoo.errors import UserError
from ssl_zoo.registry import LAUNCHERS
from ssl_zoo.schema import checked

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


@dataclasses.dataclass
class LocalConfig:
    name: str = "local"
    nprocs: int = checked(1, ge=1)


class RankError(UserError):
    """A user error raised in a spawned rank, carried to the launcher as its one-line message."""


class Stopped(Exception):
    """The run stopped on a signal after saving a checkpoint; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int, checkpoint: Optional[Path]) -> None:
        name = signal.Signals(signum).name
        where = f"after saving {checkpoint}" if checkpoint else "before its first checkpoint"
        super().__init__(f"stopped by {name} {where}; run the same command again to resume")
        self.exit_code = 128 + signum


class GracefulStop:
    """While active, the first SIGTERM/SIGUSR2 only raises a flag (and calls `on_first`), which the training
    loop polls after each step; a second SIGTERM calls `on_second` and exits at once."""

    def __init__(self, on_first: Callable[[], None] = lambda: None, on_second: Callable[[], None] = lambda: None):
        self.signum: Optional[int] = None
        self.on_first, self.on_second = on_first, on_second
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self.previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Optional[types.FrameType]) -> None:
        if self.signum is not None:
            if signum == signal.SIGTERM:
                print("received SIGTERM again: exiting now; the last complete checkpoint is kept",
                      file=sys.stderr, flush=True)
                self.on_second()
                os._exit(128 + signum)
            return
        self.signum = signum
        print(f"received {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
              "(SIGTERM again exits at once)", file=sys.stderr, flush=True)
        self.on_first()

    def is_set(self) -> bool:
        return self.signum is not None

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _latest_checkpoint(cfg: DictConfig) -> Optional[Path]:
    from ssl_zoo.engine.checkpoint import CheckpointManager

    return CheckpointManager(Path(cfg.output_dir)).latest()


def _rank_main(local_rank: int, world: int, port: int, container: dict[str, Any], stop: Any) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ssl_zoo.config import from_container
    from ssl_zoo.run import USER_ERRORS
    from ssl_zoo.train import Preempted, train

    try:
        train(from_container(container), should_stop=stop.is_set)
    except Preempted:
        pass  # the checkpoint is saved; the launcher reports the stop
    except USER_ERRORS as exc:
        raise RankError(str(exc)) from None


def _rank_error(exc: mp.ProcessRaisedException) -> Optional[RankError]:
    """The user error a rank raised, from the traceback text that torch carries to the launcher."""
    last = str(exc).strip().splitlines()[-1]
    prefix = f"{RankError.__module__}.{RankError.__qualname__}: "
    return RankError(last[len(prefix):]) if last.startswith(prefix) else None


def _spawn(cfg: DictConfig, nprocs: int) -> None:
    container = OmegaConf.to_container(cfg, resolve=True)
    stop_event = mp.get_context("spawn").Event()
    context = mp.start_processes(_rank_main, args=(nprocs, dist.free_port(), container, stop_event),
                                 nprocs=nprocs, start_method="spawn", join=False)

    def kill_ranks() -> None:
        for process in context.processes:
            if process.is_alive():
                process.kill()

    stop = GracefulStop(on_first=stop_event.set, on_second=kill_ranks)
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)  # its "terminating process" notes would follow a rank's one-line error
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as exc:
        error = _rank_error(exc)
        if error is None:
            raise
        raise error from None
    finally:
        spawn_log.setLevel(level)
        stop.restore()
    latest = _latest_checkpoint(cfg)
    if stop.signum is not None and (latest is None or latest.name != f"step-{cfg.trainer.max_steps:08d}"):
        raise Stopped(stop.signum, latest)  # else the signal came after the last step: the run is complete


@LAUNCHERS.register("local", schema=LocalConfig)
def launch_local(section: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    from ssl_zoo.train import Preempted, train

    if section.nprocs > 1:
        _spawn(cfg, section.nprocs)
        return json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    stop = GracefulStop()
    try:
        return train(cfg, should_stop=stop.is_set)
    except Preempted:
        raise Stopped(stop.signum or signal.SIGTERM, _latest_checkpoint(cfg)) from None
    finally:
        stop.restore()
