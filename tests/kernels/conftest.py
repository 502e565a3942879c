"""Kernels tests: register the ``triton_interpret`` marker here too, so the module also runs alone."""
from __future__ import annotations


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "triton_interpret: Triton kernels under TRITON_INTERPRET=1")
