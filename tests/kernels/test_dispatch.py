"""The triton / torch / auto switch: precedence, the environment variable, and errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ssl_zoo_kernels
from ssl_zoo_kernels import dispatch, get_default_impl, set_default_impl


@pytest.fixture(autouse=True)
def _restore_default():
    before = get_default_impl()
    yield
    set_default_impl(before)


def test_auto_picks_torch_for_cpu_tensors() -> None:
    set_default_impl("auto")
    assert dispatch.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_auto_picks_triton_for_cuda_tensors_when_triton_imports(monkeypatch) -> None:
    set_default_impl("auto")
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_impl("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.resolve_impl("auto", torch.device("cuda")) == "torch"


def test_default_applies_to_auto_calls_only(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    set_default_impl("triton")
    assert dispatch.resolve_impl("auto", torch.device("cpu")) == "triton"
    assert dispatch.resolve_impl("torch", torch.device("cpu")) == "torch"
    set_default_impl("TORCH")
    assert get_default_impl() == "torch"
    assert dispatch.resolve_impl("auto", torch.device("cuda")) == "torch"


def test_triton_on_cpu_tensors_without_interpreter_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ssl_zoo_kernels.vq_nearest(torch.randn(4, 3), torch.randn(5, 3), impl="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ssl_zoo_kernels.masked_linear_cross_entropy(
            torch.randn(4, 3), torch.randn(5, 3), None, torch.zeros(4, dtype=torch.long), impl="triton")


def test_unknown_impl_is_rejected() -> None:
    with pytest.raises(ValueError):
        set_default_impl("cuda")
    with pytest.raises(ValueError):
        dispatch.resolve_impl("fast", torch.device("cpu"))


def test_environment_variable_sets_the_default_at_import() -> None:
    env = dict(os.environ, SSL_ZOO_KERNEL_IMPL="torch")
    code = "import ssl_zoo_kernels as k; print(k.get_default_impl())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "torch"
