"""Wrong input of every kind fails before any work with one `error:` line naming the key, never a traceback.

The property-based test draws its wrong values from the schemas themselves (every key's type and `Limits`),
so a key or rule added later is covered without editing this file. It calls each command's `main` in
process (cheap); a few real subprocesses check the same at the command line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import typing
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssl_zoo import run as run_cli_module
from ssl_zoo.config import RootConfig, TrainerConfig
from ssl_zoo.data.datasets import EmbeddedConfig
from ssl_zoo.launch.local import LocalConfig
from ssl_zoo.schema import RULE_KEY, Limits
from ssl_zoo_peco.config import BeitConfig, PecoConfig

#: every command line that takes config overrides: name -> (main(argv) -> exit code, arguments it needs first)
ENTRY_POINTS: dict[str, tuple[Callable[[list[str]], int], list[str]]] = {
    "ssl_zoo.run": (run_cli_module.main, ["method=peco", "--print-config"]),
}
#: the sections of `method=peco`'s default config and their schemas
SECTIONS = {"trainer": TrainerConfig, "method": PecoConfig, "model": BeitConfig, "data": EmbeddedConfig,
            "launcher": LocalConfig}
#: overrides that are valid on their own, mixed in so that the wrong one is not always alone
VALID = ["trainer.max_steps=3", "seed=1", "model.depth=2", "trainer.lr=0.01", "data.image_size=32"]


@dataclasses.dataclass(frozen=True)
class Key:
    path: str
    type: Any
    limits: Limits | None


def _keys(schema: type, prefix: str) -> list[Key]:
    hints = typing.get_type_hints(schema)
    found = []
    for field in dataclasses.fields(schema):
        kind = hints[field.name]
        inner = [a for a in typing.get_args(kind) if a is not type(None)]
        base = inner[0] if typing.get_origin(kind) is typing.Union and len(inner) == 1 else kind
        if dataclasses.is_dataclass(base):
            found += _keys(base, f"{prefix}{field.name}.")
        elif field.name != "name":
            found.append(Key(f"{prefix}{field.name}", base, field.metadata.get(RULE_KEY)))
    return found


KEYS = [k for section, schema in SECTIONS.items() for k in _keys(schema, f"{section}.")] + _keys(RootConfig, "")
LIMITED = [k for k in KEYS if k.limits is not None]


def _outside(limits: Limits) -> st.SearchStrategy[str]:
    """Override values that `limits` refuses."""
    options: list[st.SearchStrategy[str]] = []
    if limits.choices is not None:
        options.append(st.text("abcdefxyz", min_size=1, max_size=6).filter(lambda v: v not in map(str, limits.choices)))
    for bound, below in ((limits.ge, True), (limits.gt, True), (limits.le, False), (limits.lt, False)):
        if bound is not None:
            inclusive = limits.gt is bound or limits.lt is bound
            step = st.integers(0 if inclusive else 1, 10**6)
            options.append(step.map(lambda d, b=bound, low=below: str(b - d if low else b + d)))
    if limits.length is not None:
        options.append(st.sampled_from([0, limits.length + 1]).map(lambda n: "[" + ",".join(["0.5"] * n) + "]"))
    if limits.min_length is not None:
        options.append(st.just("[]"))
    if limits.each is not None:
        size = limits.length or limits.min_length or 1
        options.append(_outside(limits.each).map(lambda v, n=size: "[" + ",".join([v] * n) + "]"))
    return st.one_of(options)


def _wrong_type(key: Key) -> st.SearchStrategy[str]:
    if key.type in (int, float):
        return st.sampled_from(["abc", "[1,2]", "{a: 1}"] + (["1.5", "2.0e3x"] if key.type is int else []))
    if key.type is bool:
        return st.sampled_from(["maybe", "[true]", "{a: 1}"])
    if typing.get_origin(key.type) in (list, typing.List):
        return st.sampled_from(["abc", "{a: 1}", "[[1],[2]]"])
    return st.sampled_from(["[1,2]", "{a: 1}"])


@st.composite
def wrong_override(draw: st.DrawFn) -> tuple[str, str]:
    """One wrong override and the text its error must contain."""
    kind = draw(st.sampled_from(["unknown_key", "wrong_type", "out_of_range", "unknown_option", "malformed"]))
    if kind == "unknown_key":
        section = draw(st.sampled_from(list(SECTIONS)))
        name = draw(st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True))
        key = f"{section}.{name}_x"
        return f"{key}=1", key
    if kind == "wrong_type":
        key = draw(st.sampled_from([k for k in KEYS if k.type is not typing.Any]))
        return f"{key.path}={draw(_wrong_type(key))}", key.path
    if kind == "out_of_range":
        key = draw(st.sampled_from(LIMITED))
        return f"{key.path}={draw(_outside(key.limits))}", key.path
    if kind == "unknown_option":
        group = draw(st.sampled_from(["model", "data", "launcher", "trainer"]))
        option = draw(st.from_regex(r"[a-z]{3,8}", fullmatch=True))
        return f"{group}=no_{option}", f"no_{option}"
    text = draw(st.sampled_from(["trainer.lr=[1,", "=3", "trainer.lr=}", "trainer..lr=1", "trainer.lr='a"]))
    return text, text.partition("=")[0] or text


def call(main: Callable[[list[str]], int], argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


@pytest.mark.parametrize("command", sorted(ENTRY_POINTS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(wrong=wrong_override(), valid=st.lists(st.sampled_from(VALID), max_size=2, unique=True), data=st.data())
def test_wrong_input_is_one_error_line_naming_the_key(command: str, wrong: tuple[str, str], valid: list[str],
                                                      data: st.DataObject) -> None:
    main, required = ENTRY_POINTS[command]
    text, named = wrong
    position = data.draw(st.integers(0, len(valid)))
    argv = [*required, *valid[:position], text, *valid[position:]]
    code, stderr = call(main, argv)  # an exception escaping main is the traceback this test forbids
    lines = stderr.strip().splitlines()
    assert code == 2, (argv, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, stderr)
    assert named in lines[0], (argv, lines[0])


@pytest.mark.e2e
def test_command_line_refuses_a_stage_2_value_before_stage_1(cli, tmp_path) -> None:
    """`model.img_size=100` breaks the second stage of `method=peco`; the first must not start."""
    proc = cli("method=peco", "model.img_size=100", "output_dir=run", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.img_size" in lines[0], proc.stderr
    assert "stage" not in proc.stdout and not (tmp_path / "run").exists()  # nothing trained, nothing written
