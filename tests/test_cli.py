"""The command-line seams `python -m ssl_zoo.run` and `python -m ssl_zoo.eval` share."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ssl_zoo.cli import plugin_overrides, split_flags
from ssl_zoo.errors import UserError


def test_flags_split_from_overrides_and_unknown_flags_are_user_errors():
    assert split_flags(["method=peco", "--print-config"]) == (["method=peco"], True)
    assert split_flags(["method=peco"]) == (["method=peco"], False)
    with pytest.raises(UserError, match="unknown flag --bogus; see --help"):
        split_flags(["method=peco", "--bogus"])
    assert plugin_overrides(["x=1", "plugins=[a, b]"]) == ["a", "b"]


@pytest.mark.parametrize("module", ["ssl_zoo.run", "ssl_zoo.eval"])
def test_help_into_a_reader_that_went_away_prints_no_traceback(module):
    """`--help | head -1` where head has already exited: stdout is a pipe whose read end is closed."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    process = subprocess.run([sys.executable, "-m", module, "--help"], stdout=write_end, stderr=subprocess.PIPE,
                             text=True)
    os.close(write_end)
    assert process.returncode == 0 and "Traceback" not in process.stderr, process.stderr
