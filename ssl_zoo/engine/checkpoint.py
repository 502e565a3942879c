"""Atomic checkpoints with a pointer to the last complete one.

A checkpoint is a directory `checkpoints/step-00000100/` written first as `checkpoints/.tmp-step-00000100/`
and renamed when every rank has finished writing, so a kill at any moment leaves either the old or the new
checkpoint, never half of one. `checkpoints/last` (itself replaced atomically) names the newest complete one.
What goes inside is up to the strategy (a state file, or DeepSpeed's shards) plus one `rank-N.pt` per rank
with that rank's RNG states and the trainer's position.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ssl_zoo.engine import distributed as dist


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` then rename tmp over `path` (same folder, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))


class CheckpointManager:
    def __init__(self, output_dir: Path, keep: int = 2) -> None:
        self.root = Path(output_dir) / "checkpoints"
        self.keep = max(1, keep)

    def latest(self) -> Optional[Path]:
        """The last complete checkpoint: the pointer's target, else the newest complete step directory."""
        pointer = self.root / "last"
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if target.is_dir():
                return target
        complete = sorted(self.root.glob("step-*")) if self.root.is_dir() else []
        return complete[-1] if complete else None

    def save(self, step: int, write_state: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        """Every rank calls this. `write_state(dir)` is the strategy's part (collective for DeepSpeed)."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        if dist.rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        write_state(tmp)
        torch_save({**trainer_state, "rng": rng_state()}, tmp / f"rank-{dist.rank()}.pt")
        dist.barrier()
        if dist.rank() == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(self.root / "last", lambda p: p.write_text(name + "\n"))
            for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    def load_trainer_state(self, checkpoint: Path) -> dict[str, Any]:
        """This rank's trainer state, with its RNG states restored. Loads with weights_only=True: plain data."""
        state = torch.load(checkpoint / f"rank-{dist.rank()}.pt", weights_only=True)
        set_rng_state(state.pop("rng"))
        return state


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file, or a torch file loaded with weights_only=True (never pickled
    code). A `{"model": ...}` / `{"state_dict": ...}` wrapper is unwrapped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
