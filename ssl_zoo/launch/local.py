"""The local launcher: train in this process, or in `nprocs` local processes joined for DDP.

Every launcher is a registered callable `(launcher_section, cfg) -> summary`; the SLURM one submits the
same `train(cfg)` through submitit instead.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from ssl_zoo.engine import distributed as dist
from ssl_zoo.registry import LAUNCHERS
from ssl_zoo.schema import checked


@dataclasses.dataclass
class LocalConfig:
    name: str = "local"
    nprocs: int = checked(1, ge=1)


def _rank_main(local_rank: int, world: int, port: int, container: dict[str, Any]) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from ssl_zoo.config import from_container
    from ssl_zoo.train import train

    train(from_container(container))


@LAUNCHERS.register("local", schema=LocalConfig)
def launch_local(section: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    from ssl_zoo.train import train

    if section.nprocs == 1:
        return train(cfg)
    container = OmegaConf.to_container(cfg, resolve=True)
    mp.start_processes(_rank_main, args=(section.nprocs, dist.free_port(), container),
                       nprocs=section.nprocs, start_method="spawn")
    return json.loads((Path(cfg.output_dir) / "summary.json").read_text())
