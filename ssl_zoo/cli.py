"""What `python -m ssl_zoo.run` and `python -m ssl_zoo.eval` share on their command lines."""
from __future__ import annotations

import os
import sys
from typing import Callable

from ssl_zoo.errors import UserError


def plugin_overrides(argv: list[str]) -> list[str]:
    """The modules of a `plugins=[a,b]` argument, so `--help` lists what they register."""
    for arg in argv:
        if arg.startswith("plugins="):
            return [name.strip() for name in arg.split("=", 1)[1].strip("[]").split(",") if name.strip()]
    return []


def split_flags(argv: list[str]) -> tuple[list[str], bool]:
    """The config overrides and whether `--print-config` was given; any other flag is a user error."""
    overrides = [a for a in argv if a != "--print-config"]
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        raise UserError(f"unknown flag {unknown[0]}; see --help")
    return overrides, len(overrides) != len(argv)


def exit_with(main: Callable[[], int]) -> None:
    """`sys.exit(main())`, quiet when the reader of stdout goes away (`--help | head`)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        code = 0
    sys.exit(code)
