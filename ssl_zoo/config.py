"""Strict config composition: Hydra picks the YAML group options, typed schemas check every key.

The run is configured from the core's generic groups in `configs/` (package `ssl_zoo_configs`: trainer, data,
launcher, protocol, ...) and the groups each loaded plugin ships in its own `configs/` folder (method, model,
experiment; `registry.plugin_config_dirs`): `group=option` chooses a YAML file of a group, `a.b.c=value`
overrides one key. Every section is checked against a dataclass schema before any work
starts: the core's own (`TrainerConfig`, `RootConfig`) or the one registered with the registry entry that the
section names (`method.name`, `model.name`, `data.name`, `strategy.name`, `launcher.name`). A typo or a wrong
type fails with one line naming the key path and, for a typo, the nearest valid key.

The strategy's keys were once trainer keys (`trainer.strategy=deepspeed trainer.zero_stage=3`); those spellings
still work, on the command line and in YAML or a saved `config.yaml`, with a one-line deprecation note.
"""
from __future__ import annotations

import contextlib
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ssl_zoo import registry
from ssl_zoo.registry import Registry, nearest
from ssl_zoo.schema import ConfigError, Limits, check, checked

#: groups whose sections are typed by the schema of the registry entry they name
SECTION_REGISTRIES: dict[str, Registry[Any]] = {
    "method": registry.METHODS,
    "model": registry.BACKBONES,
    "data": registry.DATASETS,
    "strategy": registry.STRATEGIES,
    "launcher": registry.LAUNCHERS,
}

#: trainer keys that became the strategy's (`trainer.strategy=X` is now the group choice `strategy=X`, the others
#: keys of the chosen strategy's section): still read, with a deprecation note
DEPRECATED_TRAINER_KEYS = ("strategy", "zero_stage", "offload_optimizer", "offload_params", "find_unused_parameters")


@dataclasses.dataclass
class TrainerConfig:
    """Method-agnostic training loop settings. `batch_size` is per process and per micro-batch."""

    max_steps: int = checked(100, ge=1)
    batch_size: int = checked(32, ge=1)
    accumulate: int = checked(1, ge=1)
    lr: float = checked(1.5e-3, ge=0)
    min_lr: float = checked(1e-5, ge=0)
    warmup_steps: int = checked(10, ge=0)
    weight_decay: float = checked(0.05, ge=0)
    betas: list[float] = checked(lambda: [0.9, 0.999], length=2, each=Limits(ge=0, lt=1))
    eps: float = checked(1e-8, gt=0)
    grad_clip: float = checked(3.0, ge=0)  # 0 turns clipping off
    # auto = bf16 where the device supports it fast
    precision: str = checked("auto", choices=("auto", "fp32", "bf16", "fp16"))
    max_bad_steps: int = checked(10, ge=1)  # non-finite steps are skipped; this many in a row stop the run
    compile: bool = False
    device: str = checked("auto", choices=("auto", "cpu", "cuda"))
    activation_checkpointing: bool = False  # recompute activations in backward (timm's set_grad_checkpointing)
    log_every: int = checked(10, ge=1)
    checkpoint_every: int = checked(50, ge=1)
    keep_checkpoints: int = checked(2, ge=1)
    visualize_every: int = checked(0, ge=0)  # 0: pictures at the end only (the only choice under ZeRO-3)
    eval_every: int = checked(0, ge=0)  # kNN top-1 on crop_id every N steps into metrics.jsonl / TensorBoard (0: off)
    eval_at_end: bool = True  # kNN and linear probe on crop_id after the last stage, beside random init
    progress: Optional[bool] = None  # None: a progress bar on a terminal, log lines otherwise


@dataclasses.dataclass
class RootConfig:
    output_dir: str = "runs/${method.name}"
    seed: int = 0
    plugins: list[str] = dataclasses.field(default_factory=list)
    method: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)
    strategy: Any = MISSING
    launcher: Any = MISSING


def trainer_subset(name: str, doc: str, **defaults: Any) -> type:
    """A schema of some `TrainerConfig` keys with other defaults, for a method's stage that sets those trainer
    keys of its run (PeCo's tokenizer stage): the keys, types and limits stay `TrainerConfig`'s, stated once."""
    hints = typing.get_type_hints(TrainerConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    unknown = sorted(set(defaults) - set(fields))
    if unknown:
        raise TypeError(f"{name}: '{unknown[0]}' is not a TrainerConfig key")
    made = []
    for key, default in defaults.items():
        value = {"default_factory": lambda v=default: list(v)} if isinstance(default, list) else {"default": default}
        made.append((key, hints[key], dataclasses.field(**value, metadata=fields[key].metadata)))
    schema = dataclasses.make_dataclass(name, made)
    schema.__doc__ = doc
    return schema


def config_dir() -> Path:
    """The core's config folder, holding the primary configs and the generic groups."""
    import ssl_zoo_configs

    return Path(ssl_zoo_configs.__file__).parent


def config_dirs() -> list[Path]:
    """Every folder of config groups: the core's, then each loaded plugin's."""
    return [config_dir(), *registry.plugin_config_dirs()]


def _search_path() -> list[str]:
    """The Hydra override that appends the loaded plugins' config folders to the core's search path."""
    folders = ",".join(f"'file://{folder}'" for folder in registry.plugin_config_dirs())
    return [f"hydra.searchpath=[{folders}]"]


def store_schema(group: str, name: str, schema: type) -> None:
    """Make `group=name` choosable from a registered schema alone, unless a YAML option has that name
    (Hydra would otherwise match the two, a deprecated behaviour; our own validation types the YAML)."""
    if not any((folder / group / f"{name}.yaml").exists() for folder in config_dirs()):
        ConfigStore.instance().store(group=group, name=name, node=schema, provider="ssl_zoo")


def _hydra() -> None:
    if not GlobalHydra.instance().is_initialized():
        initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="ssl_zoo")


#: config groups that only another primary config (not `config.yaml`) composes: `python -m ssl_zoo.eval`'s
OTHER_PRIMARY_GROUPS = ("protocol", "eval_experiment")


def groups(only: tuple[str, ...] | None = None) -> dict[str, list[str]]:
    """Config groups and their options, as `--help` shows them: `only` those, or those of `config.yaml`."""
    _hydra()
    loader = GlobalHydra.instance().config_loader()
    listed = loader.get_group_options("", results_filter=ObjectType.GROUP, overrides=_search_path())
    names = [g for g in sorted(listed) if g != "hydra"]
    names = [g for g in names if g in only] if only is not None else [g for g in names if g not in OTHER_PRIMARY_GROUPS]
    return {g: loader.get_group_options(g, overrides=_search_path()) for g in names}


def _split(overrides: list[str],
           group_names: dict[str, list[str]]) -> tuple[list[str], list[tuple[str, Any, str]], list[str]]:
    """Group choices for Hydra, key overrides for us (key, value, text), and the `plugins` modules."""
    if "strategy" in group_names:
        overrides = [_current_spelling(text) for text in overrides]
    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except HydraException as exc:
            raise ConfigError(f"cannot parse the override '{text}': {one_line(exc)} (the form is key=value or "
                              "group=option; quote values with special characters)") from None
    choices, keys, plugins = [], [], []
    for text, ov in zip(overrides, parsed):
        key = ov.key_or_group
        if not key.strip("+~"):
            raise ConfigError(f"cannot parse the override '{text}': it has no key before '=' (the form is key=value)")
        if key in group_names or key.split("/")[0] in group_names:
            choices.append(text)
        else:
            value = ov.value()
            keys.append((key, value, text))
            if key == "plugins":
                plugins = list(value) if isinstance(value, (list, tuple)) else [value]
    return choices, keys, plugins


_noted: set[str] = set()


def _note_deprecated(message: str) -> None:
    """A one-line deprecation note on stderr, once per process (every stage composes the same overrides)."""
    if message not in _noted:
        _noted.add(message)
        print(f"note: {message}", file=sys.stderr, flush=True)


def _current_spelling(text: str) -> str:
    """`trainer.strategy=X` -> `strategy=X`, `trainer.zero_stage=N` -> `strategy.zero_stage=N` (and the offload
    keys), noting the deprecation; any other override unchanged."""
    key, eq, value = text.partition("=")
    prefix, _, leaf = key.partition(".")
    if not eq or prefix != "trainer" or leaf not in DEPRECATED_TRAINER_KEYS:
        return text
    current = "strategy" if leaf == "strategy" else f"strategy.{leaf}"
    _note_deprecated(f"{key}={value} is deprecated; write {current}={value}")
    return f"{current}={value}"


def _read_deprecated_keys(raw: DictConfig, strategies: Registry[Any]) -> None:
    """Move a YAML's (or an older run's `config.yaml`'s) `trainer.strategy` / `trainer.zero_stage` / offload keys
    into the `strategy` section. A key the chosen strategy has no use for is dropped, as it was ignored before
    (an older `config.yaml` lists `zero_stage` under every strategy)."""
    trainer = raw.get("trainer")
    found = [k for k in DEPRECATED_TRAINER_KEYS if isinstance(trainer, DictConfig) and k in trainer]
    if not found:
        return
    values = {k: trainer.pop(k) for k in found}
    _note_deprecated(f"config file keys {', '.join('trainer.' + k for k in found)} are deprecated; "
                     "write them in the strategy section (strategy: {name: deepspeed, zero_stage: 3})")
    if "strategy" in values:
        name = values.pop("strategy")
        section = raw.get("strategy")
        if not isinstance(section, DictConfig) or section.get("name") != name:
            raw.strategy = {"name": name}
    section = raw.get("strategy")
    entry = strategies.entry(section.name) if isinstance(section, DictConfig) and section.get("name") in strategies \
        else None
    keys = {f.name for f in dataclasses.fields(entry.schema)} if entry and entry.schema else set()
    for key, value in values.items():
        if key in keys:
            section[key] = value


def _owner_hint(key: str, cfg: DictConfig, registries: dict[str, Registry[Any]]) -> str:
    """For a `section.key` that the section's schema lacks: the options of its group whose schema has the key
    ('' if none), as a hint (`strategy.zero_stage` is a key of strategy=deepspeed, not of strategy=auto)."""
    group, _, leaf = key.partition(".")
    table = registries.get(group)
    if table is None or "." in leaf or not isinstance(cfg.get(group), DictConfig) or leaf in cfg[group]:
        return ""
    owners = [name for name in table.names() if table.entry(name).schema is not None
              and leaf in {f.name for f in dataclasses.fields(table.entry(name).schema)}]
    return f" ({key} is a key of {' or '.join(f'{group}={n}' for n in owners)}: add that choice)" if owners else ""


def _check_choices(choices: list[str], options: dict[str, list[str]]) -> None:
    for text in choices:
        group, _, option = text.lstrip("+").partition("=")
        available = options.get(group, [])
        if option not in available and option != "null":
            hint = nearest(option, available)
            raise ConfigError(
                f"unknown {group} '{option}'" + (f"; did you mean '{hint}'?" if hint else "")
                + f" Available {group} options: {', '.join(available)}"
            )


def _key_error(exc: OmegaConfBaseException, cfg: DictConfig, prefix: str = "") -> ConfigError:
    full_key = f"{prefix}{exc.full_key}" if exc.full_key else prefix.rstrip(".")
    parent_path, _, leaf = full_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    valid = list(parent.keys()) if isinstance(parent, DictConfig) else []
    if "not in" in exc.msg or "not found" in exc.msg:
        hint = nearest(leaf, [str(k) for k in valid])
        fix = f"did you mean '{parent_path + '.' if parent_path else ''}{hint}'?" if hint else (
            f"valid keys here: {', '.join(map(str, valid))}")
        return ConfigError(f"unknown config key '{full_key}'; {fix}")
    problem = exc.msg.splitlines()[0]
    expected = next((fix for phrase, fix in _CONVERSION_FIXES.items() if phrase in problem), "")
    return ConfigError(f"bad value for config key '{full_key}': {problem}" + (f"; give {expected}" if expected else ""))


#: OmegaConf's wording of a value of the wrong type -> what to write instead
_CONVERSION_FIXES = {"converted to Float": "a number, e.g. 1e-3", "converted to Integer": "a whole number, e.g. 100",
                     "not a valid bool": "true or false"}


def _typed_section(group: str, section: Any, table: Registry[Any]) -> DictConfig:
    if not isinstance(section, DictConfig) or "name" not in section:
        raise ConfigError(f"config section '{group}' needs a 'name' naming a registered {table.kind}; "
                          f"choose one with {group}=<option> (options: {', '.join(groups((group,)).get(group, []))})")
    entry = table.entry(section.name)
    if entry.schema is None:
        return section
    typed = OmegaConf.structured(entry.schema)
    try:
        return OmegaConf.merge(typed, section)
    except OmegaConfBaseException as exc:
        raise _key_error(exc, typed, prefix=f"{group}.") from None


def validate(raw: DictConfig, root_schema: type = RootConfig,
             registries: dict[str, Registry[Any]] | None = None) -> DictConfig:
    """Merge a composed config into the typed schemas; raise ConfigError on the first bad key."""
    registries = SECTION_REGISTRIES if registries is None else registries
    root = OmegaConf.structured(root_schema)
    raw = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))  # plain, editable, interpolations kept
    if "strategy" in registries:
        _read_deprecated_keys(raw, registries["strategy"])
    sections = {}
    for group in registries:
        if group in raw:
            sections[group] = raw.pop(group)
    try:
        root = OmegaConf.merge(root, raw)
    except OmegaConfBaseException as exc:
        raise _key_error(exc, root) from None
    for group, section in sections.items():
        root[group] = _typed_section(group, section, registries[group])
    missing = [g for g in registries if OmegaConf.is_missing(root, g)]
    if missing:
        raise ConfigError(f"no {missing[0]} chosen; add {missing[0]}=<option> "
                          f"(options: {', '.join(groups((missing[0],)).get(missing[0], []))})")
    OmegaConf.set_struct(root, True)
    return root


def _compose(config_name: str, choices: list[str]) -> DictConfig:
    """Hydra's composition. A group that no chosen YAML lists (a method known only by its schema names no
    default model) is added rather than overridden: `model=x` then means `+model=x`."""
    choices = list(choices)
    while True:
        try:
            return compose(config_name=config_name, overrides=[*_search_path(), *choices])
        except HydraException as exc:
            message = str(exc).splitlines()[0]
            unmatched = [i for i, c in enumerate(choices)
                         if message == f"Could not override '{c.partition('=')[0]}'. No match in the defaults list."]
            if not unmatched:
                raise ConfigError(message) from None
            choices[unmatched[0]] = "+" + choices[unmatched[0]]


def load_config(overrides: list[str] | tuple[str, ...] = (), config_name: str = "config",
                root_schema: type = RootConfig, registries: dict[str, Registry[Any]] | None = None,
                group_names: tuple[str, ...] | None = None, settings: Mapping[str, Any] | None = None) -> DictConfig:
    """Compose `configs/<config_name>.yaml` (default `config.yaml`, the training run) with the command-line
    overrides, then apply `settings` (typed values by dotted key, as a method's stage hands them: they win
    over the command line's); return the config validated against `root_schema` and the `registries` of its
    sections."""
    overrides = list(overrides)
    registries = SECTION_REGISTRIES if registries is None else registries
    registry.load_plugins()
    choices, keys, plugins = _split(overrides, groups(group_names))
    registry.load_plugins(plugins)  # before the choices are checked: plugins add options
    _check_choices(choices, groups(group_names))
    cfg = validate(_compose(config_name, choices), root_schema, registries)
    keys += [(key, value, f"{key}={value}") for key, value in (settings or {}).items()]
    for key, value, _ in keys:
        if key.startswith(("+", "~")):
            raise ConfigError(f"'{key}': adding or deleting keys is not supported; every key has a schema")
        try:
            OmegaConf.update(cfg, key, value, merge=False)
        except OmegaConfBaseException as exc:
            error = _key_error(exc, cfg)
            raise ConfigError(f"{error}{_owner_hint(key, cfg, registries)}") from None
    if any(k.split(".")[0] in registries and k.endswith(".name") for k, _, _ in keys):
        cfg = validate(cfg, root_schema, registries)  # a section switched entries: check it against its new schema
    registry.load_plugins(cfg.plugins)
    unset = sorted(OmegaConf.missing_keys(cfg))
    if unset:
        raise ConfigError(f"config key '{unset[0]}' has no value; set it on the command line: {unset[0]}=...")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _key_error(exc, cfg) from None
    check(cfg)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def from_container(data: dict[str, Any]) -> DictConfig:
    """Rebuild a validated config in another process (spawned ranks, SLURM jobs)."""
    registry.load_plugins(data.get("plugins", []))
    cfg = validate(OmegaConf.create(data))
    check(cfg)
    return cfg


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Report a ValueError or OSError raised while `what` is built from the config (a shape that does not fit,
    a file that is missing or unreadable) as a one-line ConfigError, not a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{what}: {one_line(exc)}") from exc
