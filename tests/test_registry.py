import dataclasses

import pytest

from ssl_zoo.registry import PluginImportError, Registry, RegistryError, import_plugin, load_plugins, METHODS


def test_register_build_and_list():
    table = Registry("widget")

    @table.register("round")
    def build_round(section, size):
        return ("round", section.name, size)

    class Section:
        name = "round"

    assert table.build(Section(), 3) == ("round", "round", 3)
    assert table.names() == ["round"] and "round" in table and len(table) == 1


def test_duplicate_name_raises_naming_both_builders():
    table = Registry("widget")
    table.register("a")(lambda s: 1)
    with pytest.raises(RegistryError, match="registered twice"):
        table.register("a")(lambda s: 2)


def test_unknown_name_lists_available_and_nearest():
    table = Registry("widget")
    for name in ("square", "circle", "triangle"):
        table.register(name)(lambda s: None)
    with pytest.raises(RegistryError) as err:
        table.get("circel")
    message = str(err.value)
    assert "did you mean 'circle'" in message
    assert "circle, square, triangle" in message
    assert "\n" not in message


def test_schema_is_kept_with_entry():
    @dataclasses.dataclass
    class Schema:
        name: str = "x"

    table = Registry("widget")
    table.register("x", schema=Schema)(lambda s: None)
    assert table.entry("x").schema is Schema


def test_plugin_import_error_names_module_and_cause(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import math\nraise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginImportError) as err:
        import_plugin("broken_plugin")
    assert "broken_plugin" in str(err.value) and "boom at import" in str(err.value)


def test_config_plugin_list_registers_method():
    load_plugins(["tests.plugins.toy_method"])
    assert "toy_autoencoder" in METHODS
