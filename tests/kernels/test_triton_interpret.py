"""Runs interp_cases.py under TRITON_INTERPRET=1 in a child pytest, inside this pytest invocation.

The interpreter is chosen when ``@triton.jit`` decorates a kernel, i.e. at import, and is process-wide;
a child process keeps it from leaking into the rest of the suite (where ``impl="triton"`` on CPU must
raise) while the kernels still get checked on a machine without a GPU.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.triton_interpret
def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           str(Path(__file__).with_name("interp_cases.py"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreted kernel tests failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
