"""Shared fixtures: running the real CLI in a subprocess, reading a run's metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY = ["method=toy_autoencoder", "model=toy_mlp", "plugins=[tests.plugins.toy_method]"]


def cli_env(extra_path: Path | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: the repo on the path (for `tests.plugins`), one thread per op
    library so runs are reproducible, and no inherited rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    paths = [str(REPO)] + ([str(extra_path)] if extra_path else [])
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def run_cli(*args: str, cwd: Path, timeout: float = 600, extra_path: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "ssl_zoo.run", *args], cwd=cwd, env=cli_env(extra_path),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture
def cli():
    return run_cli
