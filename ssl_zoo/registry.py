"""Name -> builder registries, and plugin loading.

Everything the core builds from a config (methods, backbones, datasets, strategies, launchers, ...) is
looked up here by name, so a plugin outside this package adds a method without editing `ssl_zoo/`.
Plugins arrive through the `ssl_zoo.plugins` entry-point group or a `plugins: [module, ...]` config list.
A plugin package may ship config groups (`<package>/configs/<group>/<option>.yaml`, e.g. its method, model
and experiment YAML): they join the config search path when the plugin loads (`plugin_config_dirs`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

ENTRY_POINT_GROUP = "ssl_zoo.plugins"


class RegistryError(KeyError):
    """An unknown or duplicate registry name. Its message is one line meant for the user."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class PluginImportError(ImportError):
    """A plugin module failed to import; the message names the module and the original error."""


def nearest(name: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest valid name to a misspelt one, or None when nothing is close."""
    found = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered builder and the dataclass schema of its config section (None: no options)."""

    name: str
    builder: T
    schema: type | None


class Registry(Generic[T]):
    """A named table of builders filled by a decorator.

    >>> BACKBONES = Registry("backbone", group="model")
    >>> @BACKBONES.register("tiny", schema=TinyConfig)
    ... def build_tiny(cfg): ...

    `group` is the config group whose sections select entries of this registry by their `name` key;
    registering a schema also makes `group=<name>` a valid choice even without a YAML file.
    """

    def __init__(self, kind: str, group: str | None = None) -> None:
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, schema: type | None = None) -> Callable[[T], T]:
        def decorator(builder: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"{self.kind} '{name}' is registered twice "
                    f"(first by {_where(self._entries[name].builder)}, again by {_where(builder)})"
                )
            self._entries[name] = Entry(name, builder, schema)
            _add_config_dir(getattr(builder, "__module__", "").partition(".")[0])  # also when imported directly
            if schema is not None and self.group is not None:
                from ssl_zoo.config import store_schema  # late: config imports this module

                store_schema(self.group, name, schema)
            return builder

        return decorator

    def entry(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise RegistryError(self.unknown_message(name))
        return self._entries[name]

    def get(self, name: str) -> T:
        return self.entry(name).builder

    def build(self, section: Any, *args: Any, **kwargs: Any) -> Any:
        """Call the builder named by `section.name` with the section and any extra arguments."""
        return self.get(section.name)(section, *args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def unknown_message(self, name: str) -> str:
        hint = nearest(name, self.names())
        suggestion = f"; did you mean '{hint}'?" if hint else ""
        return f"unknown {self.kind} '{name}'{suggestion} Available: {', '.join(self.names()) or '(none)'}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


def _where(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


METHODS: Registry[Any] = Registry("method", group="method")
BACKBONES: Registry[Any] = Registry("backbone", group="model")
DATASETS: Registry[Any] = Registry("dataset", group="data")
LAUNCHERS: Registry[Any] = Registry("launcher", group="launcher")
STRATEGIES: Registry[Any] = Registry("strategy", group="strategy")

_loaded: set[str] = set()
_config_dirs: list[Path] = []


def plugin_config_dirs() -> list[Path]:
    """The `configs/` folders of the loaded plugin packages, in load order (Hydra's search path after the core's)."""
    return list(_config_dirs)


def _add_config_dir(module: str) -> None:
    """Record `<module>/configs` before the module is imported, so schemas it registers see its YAML options."""
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):  # not importable (`__main__`): the import itself reports a missing module
        return
    for location in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(location) / "configs"
        if folder.is_dir() and folder not in _config_dirs:
            _config_dirs.append(folder)


def import_plugin(module: str) -> None:
    """Import a plugin module once; its import registers what it provides and its configs join the search path."""
    if module in _loaded:
        return
    try:
        _add_config_dir(module)
        importlib.import_module(module)
    except Exception as exc:  # report any failure with the module's name, keep the cause
        last = traceback.extract_tb(exc.__traceback__)[-1]
        raise PluginImportError(
            f"plugin '{module}' failed to import: {type(exc).__name__}: {exc} "
            f"(at {last.filename}:{last.lineno})"
        ) from exc
    _loaded.add(module)


def load_plugins(modules: list[str] | tuple[str, ...] = ()) -> None:
    """Load every entry-point plugin, then the modules named in a config's `plugins` list."""
    import ssl_zoo.builtins  # noqa: F401  the core's own datasets, strategies and launchers

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        import_plugin(ep.value.split(":")[0])
    for module in modules:
        import_plugin(module)
