"""Value rules of config schemas, checked when a config is composed, before any work.

A schema dataclass states each key's allowed values beside its default, and rules between keys in a
`validate` hook; the core checks every typed section of a composed config with both (`check`), so a plugin's
schema gets the same treatment as the core's without the core knowing it:

    @dataclasses.dataclass
    class MyMethodConfig:
        name: str = "my_method"
        depth: int = checked(12, ge=1)
        metric: str = checked("l2", choices=("l2", "cosine"))
        betas: list[float] = checked(lambda: [0.9, 0.999], length=2, each=Limits(ge=0, lt=1))

        @staticmethod
        def validate(section: DictConfig, root: DictConfig) -> None:  # raise ConfigError naming the keys
            ...

`None` is always accepted for an `Optional` key (it means "derive it"). The ranges of the whole config are
checked first, then the hooks, so a hook may divide by a key that has a lower bound.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl_zoo.errors import UserError

RULE_KEY = "ssl_zoo.limits"


class ConfigError(UserError, ValueError):
    """A config that cannot run. The message is one line: the key path, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Allowed values of one key: bounds, a set of choices, a list length, limits on each list item."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    choices: Optional[tuple[Any, ...]] = None
    length: Optional[int] = None
    min_length: Optional[int] = None
    each: Optional["Limits"] = None

    def describe(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)):
            if bound is not None:
                parts.append(f"{op} {bound:g}")
        if self.length is not None:
            parts.append(f"a list of {self.length}")
        if self.min_length is not None:
            parts.append(f"a list of at least {self.min_length}")
        if self.each is not None:
            parts.append(f"each {self.each.describe()}")
        return ", ".join(parts)

    def allows(self, value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            if self.length is not None and len(value) != self.length:
                return False
            if self.min_length is not None and len(value) < self.min_length:
                return False
            return self.each is None or all(v is None or self.each.allows(v) for v in value)
        if self.length is not None or self.min_length is not None:
            return False
        if self.choices is not None and value not in self.choices:
            return False
        bounds = ((self.ge, lambda v, b: v >= b), (self.gt, lambda v, b: v > b),
                  (self.le, lambda v, b: v <= b), (self.lt, lambda v, b: v < b))
        return all(b is None or ok(value, b) for b, ok in bounds)


def checked(default: Any, **limits: Any) -> Any:
    """A dataclass field with `default` (a callable: a default factory, for lists) and its `Limits`."""
    rule = {RULE_KEY: Limits(**limits)}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=rule)
    return dataclasses.field(default=default, metadata=rule)


def bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error for a value outside what a key allows."""
    return ConfigError(f"bad value for config key '{key}': {value!r}; allowed: {allowed}")


def _typed_nodes(node: DictConfig, path: str = "") -> list[tuple[str, DictConfig, type]]:
    """Every node typed by a dataclass, depth first, with its key path (prefix form, 'a.b.')."""
    found = []
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig):
            found += _typed_nodes(child, f"{path}{key}.")
    schema = OmegaConf.get_type(node)
    if schema is not None and dataclasses.is_dataclass(schema):
        found.append((path, node, schema))
    return found


def check(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value outside its schema's limits, then run the schemas' hooks."""
    nodes = _typed_nodes(cfg)
    for path, node, schema in nodes:
        for field in dataclasses.fields(schema):
            rule: Optional[Limits] = field.metadata.get(RULE_KEY)
            if rule is None or field.name not in node:
                continue
            value = node[field.name]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value)
            if value is not None and not rule.allows(value):
                raise bad_value(f"{path}{field.name}", value, rule.describe())
    for path, node, schema in nodes:
        hook: Optional[Callable[[DictConfig, DictConfig], None]] = getattr(schema, "validate", None)
        if hook is not None:
            hook(node, cfg)
