"""The `strategy` config group: each strategy's keys in its own section (`strategy=deepspeed
strategy.zero_stage=3`), checked like every other section, and the old trainer spellings still read, with a note."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ssl_zoo import config as config_lib
from ssl_zoo.config import ConfigError, from_container, load_config
from ssl_zoo.eval import load_eval_config
from ssl_zoo.run import help_text
from tests.conftest import TOY

NEW = ["strategy=deepspeed", "strategy.zero_stage=3", "strategy.offload_optimizer=true"]
OLD = ["trainer.strategy=deepspeed", "trainer.zero_stage=3", "trainer.offload_optimizer=true"]


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> pytest.CaptureFixture:
    monkeypatch.setattr(config_lib, "_noted", set())  # each note is printed once per process
    return capsys


def test_deepspeed_keys_live_in_the_strategy_section() -> None:
    cfg = load_config([*TOY, *NEW])
    assert OmegaConf.to_container(cfg.strategy) == {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True,
                                                    "offload_params": False}
    assert not {"strategy", "zero_stage", "offload_optimizer", "offload_params"} & set(cfg.trainer)
    assert OmegaConf.to_container(load_config(TOY).strategy) == {"name": "auto", "find_unused_parameters": True}
    assert OmegaConf.to_container(load_config([*TOY, "strategy=single"]).strategy) == {"name": "single"}


def test_the_old_trainer_spellings_give_the_same_config_and_one_note_each(notes: pytest.CaptureFixture) -> None:
    new = OmegaConf.to_container(load_config([*TOY, *NEW]))
    assert notes.readouterr().err == ""
    assert OmegaConf.to_container(load_config([*TOY, *OLD])) == new
    assert OmegaConf.to_container(load_config([*TOY, *OLD])) == new  # a second stage's composition: no new note
    lines = notes.readouterr().err.splitlines()
    assert lines == [f"note: {old} is deprecated; write {current}" for old, current in zip(OLD, NEW)]


def test_an_older_config_yaml_is_read_with_its_strategy_keys_moved(notes: pytest.CaptureFixture) -> None:
    """Eval and export rebuild a run from its `config.yaml`; older ones list the DeepSpeed keys under trainer
    (under every strategy: the trainer schema had them), and the one-line note says where they go now."""
    cfg = load_config(TOY)
    old = OmegaConf.to_container(cfg, resolve=True)
    del old["strategy"]
    old["trainer"].update(strategy="deepspeed", zero_stage=3, offload_optimizer=False, offload_params=False)
    assert from_container(old).strategy.zero_stage == 3 and "zero_stage" not in from_container(old).trainer
    old["trainer"]["strategy"] = "auto"  # a plain run's: zero_stage meant nothing there, and is dropped
    assert OmegaConf.to_container(from_container(old).strategy) == {"name": "auto", "find_unused_parameters": True}
    err = notes.readouterr().err.splitlines()
    assert len(err) == 1 and "trainer.zero_stage" in err[0] and "strategy section" in err[0]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["strategy=deepspeed", "strategy.zero_stage=4"],
     "bad value for config key 'strategy.zero_stage': 4; allowed: one of 1, 2, 3"),
    (["trainer.strategy=deepspeed", "trainer.zero_stage=4"],  # the old spelling names the key as it is now
     "bad value for config key 'strategy.zero_stage': 4; allowed: one of 1, 2, 3"),
    (["strategy=deepspeed", "strategy.zero_stag=3"], "unknown config key 'strategy.zero_stag'; did you mean "
                                                     "'strategy.zero_stage'?"),
    (["strategy=deepsped"], "unknown strategy 'deepsped'; did you mean 'deepspeed'?"),
    (["strategy.zero_stage=3"], "(strategy.zero_stage is a key of strategy=deepspeed: add that choice)"),
    (["strategy=deepspeed", "strategy.offload_params=true"], "strategy.offload_params needs strategy.zero_stage=3"),
    (["strategy=deepspeed", "strategy.zero_stage=3", "trainer.visualize_every=5"], "strategy.zero_stage=2"),
    (["strategy=single", "strategy.find_unused_parameters=false"],
     "(strategy.find_unused_parameters is a key of strategy=auto or strategy=ddp: add that choice)"),
    (["strategy=single", "launcher.nprocs=2"], "strategy=single runs one process, but launcher=local starts 2; "
                                               "choose strategy=ddp (or auto)"),
    (["strategy=single", "launcher=slurm", "launcher.tasks_per_node=2"], "launcher=slurm starts 2"),
])
def test_a_wrong_strategy_value_is_one_line_naming_the_key(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config([*TOY, *overrides])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_ddps_flag_moved_from_trainer_to_the_strategy(notes: pytest.CaptureFixture) -> None:
    new = load_config([*TOY, "strategy=ddp", "strategy.find_unused_parameters=false"])
    assert new.strategy.find_unused_parameters is False and "find_unused_parameters" not in new.trainer
    old = load_config([*TOY, "strategy=ddp", "trainer.find_unused_parameters=false"])
    assert OmegaConf.to_container(old) == OmegaConf.to_container(new)
    assert notes.readouterr().err.strip() == ("note: trainer.find_unused_parameters=false is deprecated; "
                                              "write strategy.find_unused_parameters=false")


def test_help_lists_the_strategy_group_and_its_keys() -> None:
    text = help_text()
    group = next(line for line in text.splitlines() if line.startswith("  strategy "))
    assert group.split()[1:] == ["auto,", "ddp,", "deepspeed,", "single"]
    assert "strategy.zero_stage" in text and "(strategy=deepspeed)" in text and "trainer.zero_stage" not in text


def test_the_eval_config_has_the_strategy_group_for_fine_tuning() -> None:
    cfg = load_eval_config(["checkpoint=random", "protocol=finetune", "strategy=deepspeed", "strategy.zero_stage=1"])
    assert cfg.strategy.name == "deepspeed" and cfg.strategy.zero_stage == 1
