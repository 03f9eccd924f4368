"""The page's safety (untrusted text never becomes markup), its token table, its plots, and its
degraded forms (no tokenizer, no matplotlib)."""

from __future__ import annotations

import json
import re
import sys

from tests.report.runs import HOSTILE, UNICODE_TEXT, Encoder
from tirl.report.build import build_report
from tirl.report.data import read_run
from tirl.report.html import esc, json_for_script
from tirl.report.plots import PLOTS, render_training_plots, select_series
from tirl.report.tokens import TokenTable, load_decoder
from tirl.report.viewer import ViewerLimits, viewer_payload


def test_json_for_script_leaves_nothing_that_can_close_the_script_element():
    value = {"text": HOSTILE + "</SCRIPT><!-- & \u2028", "n": [1.5, float("nan"), float("inf")]}
    text = json_for_script(value)
    assert not set("<>&") & set(text)
    assert json.loads(text) == {"text": value["text"], "n": [1.5, None, None]}  # what JSON.parse restores


def test_esc_escapes_markup_and_quotes():
    assert esc('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"


def _data_block(page: str) -> dict:
    block = re.search(r'<script id="tirl-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    return json.loads(block)


def test_the_page_carries_hostile_text_only_as_data(run_dir):
    page = build_report(run_dir).path.read_text()
    assert page.lower().count("<script") == 2 and page.lower().count("</script") == 2  # data + viewer, no more
    assert "<img" not in page.replace('<img alt="', "")  # plots are the only images
    assert HOSTILE not in page
    assert esc(HOSTILE[:50]) in page  # the config (task.reward_kwargs; YAML wraps the line) shows it as text
    data = _data_block(page)
    texts = [u["text"] for t in data["trajs"] for u in t["turns"]]
    assert f"I will print {HOSTILE}" in texts  # the data still says exactly what the model wrote
    contents = [r["content"] for t in data["trajs"] for u in t["turns"] for r in u["results"]]
    assert HOSTILE in contents


def test_viewer_caps_trajectories_per_step_and_eval_and_says_how_many_there_were(run_dir):
    run = read_run(run_dir)
    payload = viewer_payload(run, ViewerLimits(per_step=4, per_eval=2), None)
    rl = [s for s in payload["sources"] if s["kind"] == "rl"]
    assert [(len(s["trajs"]), s["total"]) for s in rl] == [(4, 6)] * 3
    groups = [{payload["trajs"][i]["group"] for i in s["trajs"]} for s in rl]
    assert all(len(g) == 2 for g in groups)  # both groups of each step shown
    evals = [s for s in payload["sources"] if s["kind"] == "eval"]
    assert all(len(s["trajs"]) == 2 and s["total"] == 4 for s in evals)
    assert all({payload["trajs"][i]["correct"] for i in s["trajs"]} == {True, False} for s in evals)
    assert "ids" not in payload["trajs"][0] and payload["vocab"] == {}
    every = viewer_payload(run, ViewerLimits(), None)
    assert len(every["trajs"]) == 3 * 6 + 3 * 4
    assert len(every["prompts"]) == 2  # the hostile prompt and the shared one, deduplicated


def test_token_texts_rebuild_each_turn_exactly_including_characters_split_over_tokens(run_dir, smol_dir):
    enc = Encoder(smol_dir)
    decoder, where = load_decoder([run_dir / "models" / "final", smol_dir])
    assert decoder is not None and where == str(smol_dir)
    payload = viewer_payload(read_run(run_dir), ViewerLimits(), TokenTable(decoder))
    [t] = [t for t in payload["trajs"] if t["turns"][0]["text"] == UNICODE_TEXT][:1]
    assert t["fix"]  # the parrot and the CJK characters are byte fragments on their own
    for u in t["turns"]:
        start, _, end = u["span"]
        text = "".join(t["fix"].get(str(p), payload["vocab"][str(t["ids"][p])]) for p in range(start, end))
        assert text == enc.decode(t["ids"][start:end])
    assert t["mask"] == "1" * len(t["ids"])  # one turn, no tool call: every token sampled
    solved = next(t for t in payload["trajs"] if t["n_calls"] == 1 and t["correct"])
    first = solved["turns"][0]["span"]
    assert solved["mask"][first[0]:first[1]] == "1" * (first[1] - first[0])
    assert solved["mask"][first[1]:first[2]] == "0" * (first[2] - first[1])  # the tool response is inserted


def test_without_a_tokenizer_the_page_says_the_token_view_is_left_out(run_dir, tmp_path):
    (run_dir / "run.json").write_text(json.dumps({"model_path": str(tmp_path / "gone")}))
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(re.sub(r"(?m)^  name: /.*$", f"  name: {tmp_path / 'gone'}", config))
    report = build_report(run_dir)
    assert any("token view left out" in n for n in report.notes)
    page = report.path.read_text()
    assert "token view left out" in page and "ids" not in _data_block(page)["trajs"][0]


def test_without_matplotlib_the_report_is_built_without_plots_and_names_the_install(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    report = build_report(run_dir)
    assert report.plots == () and any("pip install 'tirl[report]'" in n for n in report.notes)
    assert "pip install &#x27;tirl[report]&#x27;" in report.path.read_text()


def test_a_plot_is_drawn_only_for_metrics_the_run_logged():
    records = [{"stage": "rl", "step": s, "reward/mean": 0.1 * s, "reward/format": 0.2, "train/kl": float("nan"),
                "tool_status/ok": 2.0, "tool_status/timeout": 0.0} for s in (1, 2, 3)]
    spec = {p.name: p for p in PLOTS}
    assert [k for k, _, _ in select_series(records, spec["reward"])] == ["reward/mean", "reward/format"]
    assert select_series(records, spec["kl"]) == []  # only NaN: nothing to draw
    assert [k for k, _, _ in select_series(records, spec["tool_status"])] == ["tool_status/ok"]  # zeros left out
    plots = render_training_plots({"rl": records})
    assert [p.name for p in plots] == ["reward", "tool_status"]
    assert all(p.png.startswith(b"\x89PNG\r\n\x1a\n") for p in plots)


def test_eval_table_shows_the_columns_some_stage_has_with_their_intervals():
    from tirl.report.data import EvalStage
    from tirl.report.html import eval_table_html
    from tirl.report.plots import render_eval_plot

    stages = [EvalStage("base", {"accuracy": 0.5, "problems": 4, "ci": {"accuracy": [0.25, 0.75]}}, True, ()),
              EvalStage("base_no_tools", {"accuracy": 0.25, "problems": 4}, False, ())]
    table = eval_table_html(stages)
    assert table.count("<tr") == 3 and "<th>accuracy</th>" in table and "pass@1" not in table
    assert '0.500<div class="ci">0.250–0.750</div>' in table
    assert '<td>base_no_tools</td><td>without</td>' in table and "<td>partial</td>" in table
    plot = render_eval_plot({s.name: s.summary for s in stages})
    assert plot is not None and plot.png.startswith(b"\x89PNG")
    assert render_eval_plot({"base": {"problems": 4}}) is None  # nothing to draw
