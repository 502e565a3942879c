"""Plugin-owned configs: a plugin's YAML groups join the search path when it loads, `--help` and the did-you-mean
errors see them, each method's YAML names its default model, and a YAML states only what its schema does not."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ssl_zoo import registry
from ssl_zoo.config import SECTION_REGISTRIES, ConfigError, TrainerConfig, config_dir, config_dirs, load_config
from ssl_zoo.run import help_text, main

from tests.conftest import TOY

PLUGIN = "zoo_yaml_plugin"  # a package made in tmp_path: the toy method's YAML and a model option of its own


@pytest.fixture
def yaml_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    files = {
        "__init__.py": "import tests.plugins.toy_method  # noqa: F401  (the schemas its YAML names)\n",
        "configs/method/toy_yaml.yaml": """\
            defaults:
              - /model@_global_.model: toy_mlp_wide
              - _self_
            name: toy_autoencoder
            """,
        "configs/model/toy_mlp_wide.yaml": "name: toy_mlp\nhidden: 48\n",
    }
    for name, text in files.items():
        (tmp_path / PLUGIN / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / PLUGIN / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    return [f"plugins=[{PLUGIN}]"]


def test_a_plugins_yaml_joins_the_search_path_and_names_the_default_model(yaml_plugin: list[str]) -> None:
    cfg = load_config([*yaml_plugin, "method=toy_yaml"])
    assert cfg.method.name == "toy_autoencoder" and cfg.model.hidden == 48
    assert any(folder.parent.name == PLUGIN for folder in config_dirs())
    assert load_config([*yaml_plugin, "method=toy_yaml", "model=toy_mlp"]).model.hidden == 32  # the command line wins


def test_help_and_did_you_mean_list_a_plugins_options(yaml_plugin: list[str], capsys: pytest.CaptureFixture) -> None:
    assert main(["--help", *yaml_plugin]) == 0
    model_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  model "))
    assert "toy_mlp_wide" in model_line and "beit_tiny" in model_line and "mae_vit_tiny" in model_line
    with pytest.raises(ConfigError, match="unknown model 'toy_mlp_wdie'; did you mean 'toy_mlp_wide'"):
        load_config([*yaml_plugin, "method=toy_yaml", "model=toy_mlp_wdie"])


def test_installed_plugins_own_their_method_model_and_experiment_groups() -> None:
    registry.load_plugins()
    core_groups = {p.name for p in config_dir().iterdir() if p.is_dir() and not p.name.startswith("_")}
    assert not core_groups & {"method", "model", "experiment"}
    for method, model in (("peco", "beit_tiny"), ("mae", "mae_vit_tiny")):
        assert OmegaConf.to_container(load_config([f"method={method}"]).model) == OmegaConf.to_container(
            load_config([f"method={method}", f"model={model}"]).model)
    assert "beit_huge" in help_text() and "peco_vit_base_800ep" in help_text()


def test_the_root_config_chooses_no_model() -> None:
    with pytest.raises(ConfigError, match="no model chosen; add model=<option>"):
        load_config([o for o in TOY if not o.startswith("model=")])


def _repeats(yaml: dict, defaults: dict, path: str = "") -> list[str]:
    found = []
    for key, value in yaml.items():
        if key in ("defaults", "name") or key not in defaults:
            continue
        if isinstance(value, dict) and isinstance(defaults[key], dict):
            found += _repeats(value, defaults[key], f"{path}{key}.")
        elif value == defaults[key]:
            found.append(f"{path}{key}")
    return found


def _typed_yaml_files() -> list[tuple[Path, type]]:
    registry.load_plugins()
    files = [(f, TrainerConfig) for f in (config_dir() / "trainer").glob("*.yaml")]
    for folder in config_dirs():
        for group, table in SECTION_REGISTRIES.items():
            for f in sorted((folder / group).glob("*.yaml")):
                files.append((f, table.entry(OmegaConf.load(f).name).schema))
    return files


@pytest.mark.parametrize(("path", "schema"), _typed_yaml_files(), ids=lambda v: getattr(v, "name", ""))
def test_a_yaml_option_states_only_what_its_schema_does_not(path: Path, schema: type) -> None:
    assert dataclasses.is_dataclass(schema)
    yaml = OmegaConf.to_container(OmegaConf.load(path)) or {}
    assert _repeats(yaml, OmegaConf.to_container(OmegaConf.structured(schema))) == []
