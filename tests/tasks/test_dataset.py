"""Users' own environments: the `dataset` task (files and `datasets` sources, splits, bad rows named),
a `module:factory` in `task.name`, and a task installed through the `tirl.tasks` entry-point group."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tirl.config import TaskConfig, load_config
from tirl.errors import DataError
from tirl.registry import Registry
from tirl.rewards.base import GroupContext, score
from tirl.tasks import TASKS, Task
from tirl.tasks.dataset import DEFAULT_PROMPTS, DatasetTask
from tirl.trainer.build import build_reward, build_task, check_tools
from tirl.types import StopReason, Trajectory, TrajectoryMeta

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "recipes" / "examples" / "my_dataset.yaml"
ROWS = [{"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": 2 * i, "level": i % 3} for i in range(20)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def jsonl(tmp_path) -> Path:
    return write_jsonl(tmp_path / "data.jsonl", ROWS)


def summary(task: DatasetTask) -> list[tuple[str, str, str]]:
    return [(p.id, p.question, p.answer) for p in task.heldout() + task.train_problems()]


# --- sources -------------------------------------------------------------------------------------------


def test_jsonl_rows_become_problems(jsonl):
    task = DatasetTask(path=str(jsonl), id_field="id", heldout=0.25)
    held, train = task.heldout(), task.train_problems()
    assert len(held) == 5 and len(train) == 15
    assert {p.id for p in held} | {p.id for p in train} == {r["id"] for r in ROWS}
    q3 = next(p for p in held + train if p.id == "q3")
    assert (q3.question, q3.answer, dict(q3.info)) == ("What is 3 + 3?", "6", {"level": 0})


def test_every_file_format_gives_the_same_problems(tmp_path, jsonl):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    (tmp_path / "data.json").write_text(json.dumps(ROWS))
    write_csv(tmp_path / "data.csv", ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "data.parquet")
    expected = summary(DatasetTask(path=str(jsonl), id_field="id"))
    for name in ("data.json", "data.csv", "data.parquet"):
        assert summary(DatasetTask(path=str(tmp_path / name), id_field="id")) == expected, name


def test_a_saved_dataset_directory_with_a_heldout_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:15]),
                                   "test": datasets.Dataset.from_list(ROWS[15:])})
    splits.save_to_disk(str(tmp_path / "saved"))
    task = DatasetTask(path=str(tmp_path / "saved"), heldout="test")
    assert [p.question for p in task.heldout()] == [r["question"] for r in ROWS[15:]]
    assert [p.id for p in task.heldout()] == [f"heldout/{i}" for i in range(5)]
    assert len(task.train_problems()) == 15
    with pytest.raises(DataError, match="no split 'validation'"):
        DatasetTask(path=str(tmp_path / "saved"), heldout="validation")


def test_a_directory_of_data_files_goes_through_load_dataset(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "hub_like").mkdir()
    write_jsonl(tmp_path / "hub_like" / "train.jsonl", ROWS[:12])
    write_jsonl(tmp_path / "hub_like" / "test.jsonl", ROWS[12:])
    task = DatasetTask(path=str(tmp_path / "hub_like"), split="train", heldout="test", id_field="id")
    assert [p.id for p in task.heldout()] == [r["id"] for r in ROWS[12:]]
    assert [p.id for p in task.train_problems()] == [r["id"] for r in ROWS[:12]]


def test_an_unreachable_hub_dataset_is_a_data_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set the module constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="no-such-user/no-such-dataset"):
        DatasetTask(path="no-such-user/no-such-dataset")


def test_a_second_file_as_the_heldout_split(tmp_path, jsonl):
    other = write_jsonl(tmp_path / "test.jsonl", [{"question": "What is 100 + 1?", "answer": "101"}])
    task = DatasetTask(path=str(jsonl), heldout=str(other))
    assert [(p.id, p.answer) for p in task.heldout()] == [("heldout/0", "101")]
    assert len(task.train_problems()) == 20


# --- splits --------------------------------------------------------------------------------------------


def test_fraction_split_is_seeded_and_disjoint(jsonl):
    def held(**kw):
        return [p.id for p in DatasetTask(path=str(jsonl), **kw).heldout()]

    assert held() == held(seed=7)  # seed orders training only
    assert held(split_seed=1) != held()
    assert len(held()) == 2 and len(held(heldout=0.5)) == 10 and len(held(heldout=0.001)) == 1
    task = DatasetTask(path=str(jsonl))
    assert not {p.id for p in task.heldout()} & {p.id for p in task.train_problems()}


def test_training_rows_repeating_a_heldout_question_are_left_out(tmp_path, capsys):
    rows = [{"question": "Same?", "answer": "yes"}] * 2 + [{"question": f"Q{i}?", "answer": "a"} for i in range(8)]
    other = write_jsonl(tmp_path / "held.jsonl", rows[:1])
    task = DatasetTask(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), heldout=str(other))
    assert "Same?" not in {p.question for p in task.train_problems()} and len(task.train_problems()) == 8
    assert "2 training rows" in capsys.readouterr().err


def test_train_stream_covers_each_row_once_per_epoch(jsonl):
    task = DatasetTask(path=str(jsonl), seed=1)
    pool = {p.id for p in task.train_problems()}
    epochs = [[task.train_problem(i).id for i in range(e * 18, (e + 1) * 18)] for e in range(2)]
    assert set(epochs[0]) == set(epochs[1]) == pool and len(set(epochs[0])) == 18 and epochs[0] != epochs[1]
    assert [DatasetTask(path=str(jsonl), seed=1).train_problem(i).id for i in range(18)] == epochs[0]


# --- answers, prompts, rewards -------------------------------------------------------------------------


def test_list_answers_are_aliases_for_the_qa_reward(tmp_path):
    rows = [{"question": "Capital of France?", "answer": ["Paris", "City of Paris"]},
            {"question": "2 + 2?", "answer": 4.0}, {"question": "Half?", "answer": 0.5}]
    task = DatasetTask(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), heldout=str(tmp_path / "d.jsonl"))
    paris, four, half = task.heldout()
    assert (paris.answer, paris.info["answers"], four.answer, half.answer) == (
        "Paris", ["Paris", "City of Paris"], "4", "0.5")
    bound = build_reward(TaskConfig(name="dataset"), task)
    assert bound.name == "qa_em"
    final = Trajectory((), (), (), (), (), (), StopReason.ANSWERED, TrajectoryMeta("t", "g"),
                       final_answer="<answer>the city of Paris</answer>")
    assert asyncio.run(score(bound, final, paris, GroupContext(()))).correct


def test_system_prompt_default_states_the_answer_format_and_can_be_replaced(jsonl):
    task = DatasetTask(path=str(jsonl))
    assert task.system_prompt(True) == DEFAULT_PROMPTS[True] and "<answer>" in task.system_prompt(False)
    assert "tools" in task.system_prompt(True) and "tools" not in task.system_prompt(False)
    mine = DatasetTask(path=str(jsonl), system_prompt="Reply in <answer></answer>.")
    assert mine.system_prompt(True) == mine.system_prompt(False) == "Reply in <answer></answer>."


def test_the_example_recipe_builds(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(str(EXAMPLE), [])
    task = build_task(cfg.task)
    check_tools(cfg, task)
    assert build_reward(cfg.task, task).name == "arithmetic"
    assert len(task.heldout()) == 4 and len(task.train_problems()) == 12
    assert all(p.answer.isdigit() for p in task.heldout() + task.train_problems())


def test_the_example_recipe_evaluates_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    """`tirl eval` on the example data with a tiny random model: env, calculator and reward run together."""
    from tirl.cli import main

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "dataset", str(EXAMPLE), f"run.dir={run}",
                 "rollout.max_new_tokens_per_turn=8", "rollout.max_new_tokens=16", "eval.no_tools=false"]) == 0
    (trajectories,) = (run / "eval").glob("*.jsonl")
    rows = [json.loads(line) for line in trajectories.read_text().splitlines()]
    assert sorted(r["meta"]["task_id"] for r in rows) == ["word-01", "word-04", "word-07", "word-10"]


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines, message", [
    (['{"question": "Q?", "answer": "1"}', '{"question": "Q2?"}'], r"line 2: no field 'answer' \(set answer_field\)"),
    (['{"q": "Q?", "answer": "1"}'], r"line 1: no field 'question' \(set question_field\); the row has \['answer', 'q'\]"),
    (['{"question": "  ", "answer": "1"}'], "line 1: field 'question' must be a non-empty string"),
    (['{"question": "Q?", "answer": {"a": 1}}'], "line 1: field 'answer' must be a non-empty string, a number"),
    (['{"question": "Q?", "answer": true}'], "line 1: field 'answer'"),
    (['{"question": "Q?", "answer": []}'], "line 1: field 'answer' is an empty list"),
    (['{"question": "Q?", "answer": null}'], "line 1: field 'answer'"),
    (['{"question": "Q?", "answer": "1"}', "", '{"question": "Q?", "answer": 2'], "line 3: not valid JSON"),
    (['["Q?", "1"]'], "line 1: expected an object with fields, got list"),
])
def test_bad_rows_name_the_file_and_row(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message) as info:
        DatasetTask(path=str(path), heldout=str(path))
    assert str(path) in str(info.value)


def test_bad_csv_json_and_ids(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("question,answer\nQ1?,1\nQ2?,2,extra\n")
    with pytest.raises(DataError, match=r"bad.csv, row 2 \(line 3\): more cells"):
        DatasetTask(path=str(bad_csv))
    empty_cell = tmp_path / "empty.csv"
    empty_cell.write_text("question,answer\nQ1?,\nQ2?,2\n")
    with pytest.raises(DataError, match=r"empty.csv, row 1 \(line 2\): field 'answer'"):
        DatasetTask(path=str(empty_cell))
    (tmp_path / "obj.json").write_text('{"question": "Q?"}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        DatasetTask(path=str(tmp_path / "obj.json"))
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "A?", "answer": 1},
                                               {"id": "1", "question": "B?", "answer": 2}, *ROWS[:4]])
    with pytest.raises(DataError, match="id '1' occurs twice"):
        DatasetTask(path=str(dup), id_field="id")
    with pytest.raises(DataError, match=r"line 5: no field 'uid' \(set id_field\)"):
        DatasetTask(path=str(write_jsonl(tmp_path / "ids.jsonl", [{"uid": 1, "question": "A?", "answer": 1}] * 4
                                         + [{"question": "B?", "answer": 2}])), id_field="uid")


def test_bad_sources_and_keywords(tmp_path, jsonl):
    with pytest.raises(DataError, match="does not exist"):
        DatasetTask(path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no rows"):
        DatasetTask(path=str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="split='test' is for datasets"):
        DatasetTask(path=str(jsonl), split="test")
    with pytest.raises(DataError, match="at least 2"):
        DatasetTask(path=str(write_jsonl(tmp_path / "one.jsonl", ROWS[:1])))
    with pytest.raises(DataError, match="has no splits"):
        DatasetTask(path=str(jsonl), heldout="test")
    for kwargs, word in (({"heldout": 1.0}, "heldout"), ({"heldout": 0}, "heldout"), ({"seed": "0"}, "seed"),
                         ({"question_field": ""}, "question_field"), ({"system_prompt": 3}, "system_prompt")):
        with pytest.raises(ValueError, match=word):
            DatasetTask(path=str(jsonl), **kwargs)
    with pytest.raises(ValueError, match="path"):
        DatasetTask(path="")


def test_bad_data_in_a_recipe_is_reported_by_the_cli(tmp_path, capsys):
    """A DataError is a TirlError: `tirl eval` prints one line naming the file and row and exits 2."""
    from tirl.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "Q?", "answer": "1"}, {"question": "Q?"}])
    code = main(["eval", "--model", "embedded:SmolLM2-135M-Instruct", "--task", "dataset", f"run.dir={tmp_path / 'r'}",
                 f"task.kwargs={{path: {bad}}}"])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 2 and "bad.jsonl, line 2: no field 'answer'" in out


# --- a user's own Task from Python --------------------------------------------------------------------

USER_MODULE = '''
"""A user's environment: the dataset task on their file, with their own system prompt."""
from tirl.tasks.dataset import DatasetTask

DATA = {data!r}


def make_task(heldout=0.25, **kwargs):
    return DatasetTask(path=DATA, system_prompt="Think, then answer in <answer></answer>.", heldout=heldout, **kwargs)
'''


def test_module_factory_in_task_name(tmp_path, jsonl, monkeypatch):
    (tmp_path / "my_env_mod.py").write_text(USER_MODULE.format(data=str(jsonl)))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = build_task(TaskConfig(name="my_env_mod:make_task", kwargs={"heldout": 0.5, "seed": 3}))
    assert isinstance(task, Task) and len(task.heldout()) == 10
    assert task.system_prompt(True).startswith("Think")
    assert "my_env_mod:make_task" not in TASKS  # loaded by path, never registered
    from tirl.errors import ConfigError

    with pytest.raises(ConfigError, match="task.kwargs for 'my_env_mod:make_task': .*heldout"):
        build_task(TaskConfig(name="my_env_mod:make_task", kwargs={"heldout": 2.0}))
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        build_task(TaskConfig(name="my_env_mod:nope"))


ENTRY_POINT_MODULE = '''
from tirl.tasks.dataset import DatasetTask


class PluginTask(DatasetTask):
    """Plugin questions from an installed package (entry point test)."""

    name = "plugin_questions"

    def __init__(self, **kwargs):
        super().__init__(path={data!r}, **kwargs)
'''


@pytest.fixture
def installed_plugin(tmp_path, jsonl) -> Path:
    """A package 'installed' on a path entry: its module and a dist-info with a tirl.tasks entry point."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "tirl_plugin_mod.py").write_text(ENTRY_POINT_MODULE.format(data=str(jsonl)))
    info = site / "tirl_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tirl-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tirl.tasks]\nplugin_questions = tirl_plugin_mod:PluginTask\n")
    return site


def test_entry_point_task_is_found_by_a_registry(installed_plugin, monkeypatch):
    monkeypatch.syspath_prepend(str(installed_plugin))
    fresh = Registry("task", entry_point_group="tirl.tasks")
    assert "plugin_questions" in fresh
    cls = fresh.get("plugin_questions")
    assert cls.__name__ == "PluginTask" and len(cls(heldout=0.5).heldout()) == 10
    assert fresh.describe()["plugin_questions"] == "Plugin questions from an installed package (entry point test)."


def test_tirl_envs_lists_an_installed_task(installed_plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(installed_plugin), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tirl.cli", "envs"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=installed_plugin)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0, proc.stderr
    for name in ("plugin_questions", "dataset", "code", "arithmetic"):
        assert name in out
    assert "Plugin questions from an installed package" in out
    without = subprocess.run([sys.executable, "-m", "tirl.cli", "envs"], capture_output=True, text=True, timeout=120,
                             env={k: v for k, v in env.items() if k != "PYTHONPATH"})
    assert "plugin_questions" not in without.stdout


def test_an_installed_task_runs_through_build_task(installed_plugin, tmp_path):
    """`task.name: plugin_questions` resolves through the global registry (in a fresh process, so the
    test's registry stays clean)."""
    script = textwrap.dedent("""
        from tirl.config import TaskConfig
        from tirl.trainer.build import build_task
        task = build_task(TaskConfig(name="plugin_questions", kwargs={"heldout": 0.5}))
        print(type(task).__name__, len(task.heldout()))
    """)
    env = {**os.environ, "PYTHONPATH": str(installed_plugin)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PluginTask", "10"]
