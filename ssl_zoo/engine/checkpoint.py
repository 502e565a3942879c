"""Atomic checkpoints with a pointer to the last complete one, and loading weights without running code.

A checkpoint is a directory `checkpoints/step-00000100/` written first as `checkpoints/.tmp-step-00000100/`
and renamed when every rank has finished writing, so a kill at any moment leaves either the old or the new
checkpoint, never half of one. `checkpoints/last` (itself replaced atomically) names the newest complete one.
A directory leaves the `step-*` names by a rename too (to `.trash-*`) before it is deleted, so a kill while
deleting never leaves a partial `step-*`. What goes inside is up to the strategy (a state file, or DeepSpeed's
shards) plus one `rank-N.pt` per rank with that rank's RNG states and the trainer's position. A write that
fails (a full disk) removes its temporary directory and raises `CheckpointWriteError` on every rank: the
previous checkpoint and the pointer stay as they were.

Every file of weights that a user may hand over (a checkpoint to resume, a tokenizer, a perceptual network,
DeepSpeed's shards, which DeepSpeed itself unpickles with `weights_only=False`) goes through `safe_load` or
`check_files` first: torch's weights-only unpickler, which refuses any pickled callable that is not data.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch

from ssl_zoo.engine import distributed as dist
from ssl_zoo.errors import UserError


class CheckpointError(UserError, ValueError):
    """A weights file that is not safe to load (pickled code) or cannot be read; one line naming the file."""


class CheckpointWriteError(UserError, OSError):
    """Writing a checkpoint failed; the message names the previous checkpoint, which is intact."""


def safe_load(path: str | Path, map_location: Any = "cpu", allowed: Iterable[Any] = (), mmap: bool = False) -> Any:
    """`torch.load` with weights_only=True (plus the data classes in `allowed`), every failure one line.
    `mmap` reads no tensor data: a cheap check of a file that another library will load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at '{path}'")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)|global '?([\w.]+)", str(exc))
        what = f" ({next(g for g in found.groups() if g)})" if found else ""
        raise CheckpointError(f"refusing to load '{path}': it holds pickled code or objects{what}, not plain "
                              "weights, and loading it could run that code; re-save the weights as "
                              "safetensors or torch.save(state_dict) from a trusted process") from None
    except Exception as exc:  # not a torch file at all: truncated, text, another format
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read '{path}' as weights: it is neither a torch.save file nor safetensors "
                              f"({type(exc).__name__}: {first})") from None


def deepspeed_data_classes() -> list[Any]:
    """The plain-data classes in DeepSpeed's checkpoint files, allowed beside torch's own."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_files(directory: Path, allowed: Iterable[Any] = ()) -> None:
    """Refuse a directory of torch files (DeepSpeed's shards) if any of them holds pickled code."""
    allowed = list(allowed)
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file() and p.suffix in (".pt", ".pth", ".bin"))
    for path in files:
        safe_load(path, allowed=allowed, mmap=True)


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

    def _discard(self, directory: Path) -> None:
        """Rename out of the `step-*` names first (atomic), then delete: a kill midway leaves only trash."""
        if directory.exists():
            trash = self.root / f".trash-{directory.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(directory, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def save(self, step: int, write_state: Callable[[Path], None], trainer_state: dict[str, Any]) -> Path:
        """Every rank calls this. `write_state(dir)` is the strategy's part (collective for DeepSpeed)."""
        name = f"step-{step:08d}"
        tmp, final = self.root / f".tmp-{name}", self.root / name
        previous = self.latest()
        error: Optional[OSError] = None
        if dist.rank() == 0:
            for leftover in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:  # from a killed run
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        try:
            write_state(tmp)
            torch_save({**trainer_state, "rng": rng_state()}, tmp / f"rank-{dist.rank()}.pt")
        except OSError as exc:
            error = exc
        # the two flags stand where barriers would: a failure on one rank stops every rank, none waits forever
        if not _any_rank(error is not None) and dist.rank() == 0:
            try:
                self._discard(final)
                os.replace(tmp, final)
                atomic_write(self.root / "last", lambda p: p.write_text(name + "\n"))
                for old in sorted(self.root.glob("step-*"))[: -self.keep]:
                    self._discard(old)
            except OSError as exc:
                error = exc
        if _any_rank(error is not None):
            if dist.rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = self.latest() or previous
            cause = f"{error.strerror or error}" if error is not None else "it failed on another rank"
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} under '{self.root}' ({cause}); training stopped. "
                + (f"The last complete checkpoint {kept.name} and checkpoints/last are intact: free space and run "
                   "the same command again to resume from it" if kept else "No earlier checkpoint exists"))
        return final

    def load_trainer_state(self, checkpoint: Path) -> dict[str, Any]:
        """This rank's trainer state, with its RNG states restored. Loads with weights_only=True: plain data."""
        state = safe_load(checkpoint / f"rank-{dist.rank()}.pt")
        set_rng_state(state.pop("rng"))
        return state


def _any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a collective: every rank calls it, in the same order)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


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
        return load_safetensors(path)
    state = safe_load(path)
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file (a format that holds no code), any read failure one line naming the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # truncated, not safetensors at all, a bad header
        raise CheckpointError(f"cannot read '{path}' as a safetensors file: {exc}") from None
