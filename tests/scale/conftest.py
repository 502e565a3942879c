"""Fixtures of the scale tests: the markers, a runner for `python -m ssl_zoo.run` in a child process (so every
run gets a fresh process group and DeepSpeed accelerator), and a real one-node SLURM cluster for the session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_SCRIPTS = REPO.parent / "shared" / "slurm"
#: a small, fast toy run on CPU (the toy method is a plugin outside the package)
TOY = ["plugins=[tests.plugins.toy_method]", "method=toy_autoencoder", "model=toy_mlp", "trainer.device=cpu",
       "trainer.batch_size=8", "trainer.log_every=1", "data.image_size=32", "data.samples_per_epoch=64",
       "data.num_workers=0", "trainer.warmup_steps=2", "trainer.lr=3e-3"]
#: a tiny PeCo on the embedded photos: ViT with 2 blocks on a 4 x 4 patch grid, 64 codes, 3 tokenizer steps, no
#: end-of-run score (tests/test_eval_runs.py turns it on where it tests it); fp32, so that no figure depends on
#: whether this CPU is fast in bf16 (`precision=auto`): ZeRO-3's bf16 step after a resume with recomputation is
#: not bit-exact (benchmarks/RESULTS.md, "ZeRO-3 resume in bf16")
TINY_PECO = ["method=peco", "model.img_size=64", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
             "method.mask.num_masked=6", "method.mask.min_block=2", "method.tokenizer.quantizer.num_codes=64",
             "method.tokenizer_training.max_steps=3", "method.tokenizer_training.batch_size=8",
             "method.tokenizer_training.log_every=1", "data.image_size=64", "data.samples_per_epoch=64",
             "data.num_workers=0", "trainer.device=cpu", "trainer.batch_size=8", "trainer.log_every=1",
             "trainer.warmup_steps=2", "trainer.lr=3e-3", "trainer.eval_at_end=false", "trainer.precision=fp32"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deepspeed: DeepSpeed ZeRO runs on CPU with 2 processes over gloo")
    config.addinivalue_line("markers", "slurm: jobs on a real one-node SLURM cluster started by the session")


#: where DeepSpeed's just-in-time C++ ops (cpu_adam, for optimiser offload) are built: outside the virtual
#: environment, which CI recreates, so the 60-100 s build happens once per machine, not once per CI run
TORCH_EXTENSIONS_DIR = os.environ.get("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ssl_zoo" / "torch_extensions"))


def child_env() -> dict[str, str]:
    """DeepSpeed on CPU: accelerator pinned, one extension folder."""
    return {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR}


def run_zoo(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "ssl_zoo.run", *overrides], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-1 export of the tiny PeCo tokenizer, trained for 3 steps by the real CLI."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    run_zoo(*[o.replace("method=peco", "method=peco_tokenizer") for o in TINY_PECO], "trainer.max_steps=3",
            f"output_dir={out}")
    return out / "export" / "method.safetensors"


@pytest.fixture(scope="session")
def slurm_partition() -> str:
    """Start the local SLURM cluster (unless one already answers) and stop it after the session."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start the local SLURM cluster")
    if not (SLURM_SCRIPTS / "start-local-slurm.sh").is_file():
        pytest.skip(f"needs the local SLURM scripts at {SLURM_SCRIPTS}")
    running = shutil.which("scontrol") is not None and subprocess.run(
        ["scontrol", "ping"], capture_output=True, text=True).stdout.count("UP") > 0
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start-local-slurm.sh")], capture_output=True,
                             text=True, timeout=900)
    assert started.returncode == 0, f"the local SLURM cluster did not start:\n{started.stderr[-3000:]}"
    yield started.stdout.strip().splitlines()[-1]
    if not running:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop-local-slurm.sh")], capture_output=True, timeout=300)
