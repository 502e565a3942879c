"""Strict composition: bad input fails before any work, with one line naming the key and the fix."""
import pytest
from omegaconf import OmegaConf

from ssl_zoo.config import ConfigError, load_config
from tests.conftest import TOY


def test_composes_groups_and_typed_overrides():
    cfg = load_config([*TOY, "trainer.lr=0.01", "trainer.betas=[0.5,0.9]", "data=synthetic", "seed=3"])
    assert cfg.trainer.lr == 0.01 and list(cfg.trainer.betas) == [0.5, 0.9]
    assert cfg.data.name == "synthetic" and cfg.seed == 3
    assert cfg.output_dir == "runs/toy_autoencoder"  # interpolation resolved
    assert OmegaConf.is_struct(cfg)


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.lrr=1"], "unknown config key 'trainer.lrr'; did you mean 'trainer.lr'?"),
    (["trainer.lr=abc"], "bad value for config key 'trainer.lr': Value 'abc' of type 'str' could not be converted to "
                         "Float; give a number, e.g. 1e-3"),
    (["model.hiden=3"], "did you mean 'model.hidden'?"),
    (["data=embeded"], "unknown data 'embeded'; did you mean 'embedded'?"),
    (["data=flat_folder"], "config key 'data.root' has no value"),
    (["trainer.max_steps=1.5"], "bad value for config key 'trainer.max_steps'"),
    (["trainer.max_steps=ten"], "could not be converted to Integer; give a whole number, e.g. 100"),
    (["trainer.activation_checkpointing=maybe"], "is not a valid bool (type str); give true or false"),
])
def test_bad_input_names_key_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config([*TOY, *overrides])
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_method_lists_available(cli, tmp_path):
    proc = cli("method=nope", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown method 'nope'" in lines[0] and "peco" in lines[0]


def test_cli_typo_names_nearest_key(cli, tmp_path):
    proc = cli(*TOY, "trainer.lrr=1", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "trainer.lr'?" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli(*TOY, "trainer.lr=abc", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "trainer.lr" in proc.stderr and "Traceback" not in proc.stderr


def test_help_lists_groups_and_options(cli, tmp_path):
    out = cli("--help", cwd=tmp_path).stdout
    for group in ("method", "model", "data", "trainer", "launcher"):
        assert f"\n  {group} " in out
    assert "embedded" in out and "trainer.max_steps" in out


def test_print_config_runs_nothing(cli, tmp_path):
    out = cli(*TOY, "trainer.max_steps=7", "--print-config", cwd=tmp_path).stdout
    assert "max_steps: 7" in out and "name: toy_autoencoder" in out
    assert not (tmp_path / "runs").exists()
