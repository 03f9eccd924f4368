"""Config loading: defaults, recipes, overrides; every error names the key."""

from __future__ import annotations

import pytest

from tirl.config import Config, load_config
from tirl.errors import ConfigError


def test_defaults_are_the_embedded_default():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name == "embedded:SmolLM2-135M-Instruct" and cfg.task.name == "arithmetic"
    assert str(cfg.run_dir()) == "runs/default"


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rl:\n  steps: 7\nrollout:\n  group_size: 4\n")
    cfg = load_config(recipe, ["rl.steps=9", "rl.optim.lr=3e-6", "task.kwargs.levels=[1,2]", "run.dir=x/y"])
    assert cfg.rl.steps == 9 and cfg.rollout.group_size == 4 and cfg.rl.optim.lr == 3e-6
    assert cfg.task.kwargs == {"levels": [1, 2]} and str(cfg.run_dir()) == "x/y"


@pytest.mark.parametrize("overrides, message", [
    (["rollout.grup_size=3"], "rollout.grup_size: unknown key (did you mean 'group_size'?)"),
    (["rl.steps=abc"], "rl.steps: Input should be a valid integer"),
    (["rl.steps=0"], "rl.steps: Input should be greater than or equal to 1"),
    (["rl.optim.lr=-1"], "rl.optim.lr: Input should be greater than 0"),
    (["model.dtype=fp8"], "model.dtype"),
    (["nonsense=1"], "nonsense: unknown key"),
    (["rl"], "must look like section.key=value"),
    (["rl.steps=3", "rl.steps.x=1"], "is a value, not a section"),
    (["rl.steps.x=1"], "override rl.steps.x: 'steps' is a value, not a section"),
    (["rollout.max_new_tokens_per_turn=500", "rollout.max_new_tokens=100"], "cannot exceed"),
    (["model.lora.r=4"], "model.lora.r has no effect unless model.lora.enabled=true"),
    (["algorithm.kl_estimator=k2"], "algorithm.kl_estimator has no effect while algorithm.kl_coef is 0"),
    (["rl.enabled=false"], "rl.enabled: unknown key"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_bad_recipe_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(lst)


def test_yaml_round_trip():
    cfg = load_config(None, ["rl.steps=3"])
    import yaml

    assert Config.model_validate(yaml.safe_load(cfg.to_yaml())) == cfg


def test_a_saved_config_is_a_valid_recipe(tmp_path):
    cfg = load_config(None, ["model.lora.enabled=true", "model.lora.r=4", "algorithm.kl_coef=0.01"])
    recipe = tmp_path / "config.yaml"
    recipe.write_text(cfg.to_yaml())
    assert load_config(recipe) == cfg
    plain = tmp_path / "plain.yaml"
    plain.write_text(load_config().to_yaml())
    assert load_config(plain) == load_config()


def test_default_recipe_is_the_default():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "default.yaml"
    assert load_config(recipe) == load_config()


def test_overriding_one_key_keeps_its_siblings(tmp_path):
    """sft.optim defaults to lr 3e-5 with 2 warm-up steps, unlike OptimConfig's own defaults: setting
    one key must not reset the others to OptimConfig's."""
    cfg = load_config(None, ["sft.optim.lr=1e-4"])
    assert cfg.sft.optim.lr == 1e-4 and cfg.sft.optim.warmup_steps == Config().sft.optim.warmup_steps == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rl:\n  optim:\n    weight_decay: 0.1\n")
    assert load_config(recipe).rl.optim.lr == Config().rl.optim.lr


def test_task_factory_must_make_a_task(monkeypatch):
    """A `module:factory` task name that returns something else is a ConfigError naming what it made."""
    import sys
    import types

    from tirl.config import TaskConfig
    from tirl.errors import ConfigError
    from tirl.trainer.build import build_task

    module = types.ModuleType("tirl_test_bad_factory")
    module.make = lambda: {"not": "a task"}
    monkeypatch.setitem(sys.modules, "tirl_test_bad_factory", module)
    with pytest.raises(ConfigError, match="made a dict, not a tirl Task"):
        build_task(TaskConfig(name="tirl_test_bad_factory:make"))


def test_task_tool_defaults_apply_only_to_tools_in_use():
    """A task's default `tools.<name>` settings are dropped when the recipe does not use that tool."""
    from tirl.config import Config, TaskConfig
    from tirl.tasks.arithmetic import ArithmeticTask
    from tirl.trainer.build import tool_settings

    class WithDefaults(ArithmeticTask):
        def tool_settings(self):
            return {"search": {"top_k": 2}, "calculator": {}}

    task = WithDefaults()
    cfg = Config(task=TaskConfig(tools=["calculator"]))
    assert tool_settings(cfg, task) == {"calculator": {}}
    cfg = Config(task=TaskConfig(tools=["search"]), tools={"search": {"corpus": "c.jsonl"}})
    assert tool_settings(cfg, task) == {"search": {"top_k": 2, "corpus": "c.jsonl"}}
