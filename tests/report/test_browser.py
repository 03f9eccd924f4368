"""The report as a person uses it: opened from disk in headless Chromium (no server, no network), a
trajectory found by step and reward, its turns, tool results, token shading and reward read off the page.

Needs Debian's chromium (/usr/bin/chromium, or $TIRL_CHROMIUM) and the playwright package (no browser
download). Screenshots go to $TIRL_TEST_ARTIFACTS (default: test-artifacts/ in the repository root).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.report.runs import HOSTILE, HOSTILE_TASK, UNICODE_TEXT
from tirl.report.build import build_report

CHROMIUM = os.environ.get("TIRL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set TIRL_CHROMIUM)")
    args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # root cannot use the sandbox
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        yield b
        b.close()


@pytest.fixture
def artifacts() -> Path:
    root = Path(__file__).resolve().parents[2]
    out = Path(os.environ.get("TIRL_TEST_ARTIFACTS") or root / "test-artifacts") / "report"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def page(browser, run_dir):
    """The built report, opened from its file with network requests refused."""
    report = build_report(run_dir)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    requests: list[str] = []
    context.route("**/*", lambda route: (requests.append(route.request.url), route.continue_()
                                         if route.request.url.startswith(("file:", "data:")) else route.abort()))
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(report.path.as_uri())
    yield pg
    assert errors == [], errors  # the viewer script ran without an exception
    assert all(u.startswith(("file:", "data:")) for u in requests), requests  # nothing fetched from a network
    context.close()


def _rows(pg):
    return pg.locator("#traj-list tbody tr")


def test_click_through_to_a_trajectory_and_read_it(page, artifacts):
    pg = page
    assert pg.locator(".eval-table tbody tr").count() == 3
    assert pg.locator("figure.plot img").count() >= 10
    assert pg.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert _rows(pg).count() == 30

    pg.select_option("#source", "rl/2")
    assert _rows(pg).count() == 6
    assert "RL step 2 had 6" in pg.locator("#count").inner_text()
    pg.select_option("#sort", "reward-desc")
    first = _rows(pg).first
    assert "1.200" in first.inner_text()
    first.click()

    detail = pg.locator("#traj-detail")
    assert "RL step 2 · arithmetic/train/" in detail.locator("h3").first.inner_text()
    turns = detail.locator(".turn")
    assert turns.count() == 2
    assert '"expression": "17 * 23"' in turns.nth(0).locator(".model-text").inner_text()
    result = turns.nth(0).locator(".tool-call")
    assert result.locator(".status").inner_text() == "ok"
    assert result.locator(".tool-result").inner_text() == "391"
    assert turns.nth(1).locator(".model-text").inner_text() == "<answer>391</answer>"

    # tokens shaded by loss mask: the call is sampled, the tool response inserted
    sampled = "".join(turns.nth(0).locator(".tok.sampled").all_inner_texts())
    inserted = "".join(turns.nth(0).locator(".tok.inserted").all_inner_texts())
    assert '"expression": "17 * 23"' in sampled and "391" not in sampled
    assert "<tool_response>\n391\n</tool_response>" in inserted
    shade = "el => getComputedStyle(el).backgroundColor"
    assert (turns.nth(0).locator(".tok.sampled").first.evaluate(shade)
            != turns.nth(0).locator(".tok.inserted").first.evaluate(shade))

    # the reward and its components
    assert "reward 1.200" in detail.locator(".reward-total").inner_text()
    assert detail.locator('tr[data-component="correct"] td.num').inner_text() == "1.000"
    assert detail.locator('tr[data-component="format"] td.num').inner_text() == "0.200"
    pg.locator("#trajectories").screenshot(path=str(artifacts / "trajectory.png"))
    pg.screenshot(path=str(artifacts / "report-top.png"))


def test_filters_by_reward_and_outcome_and_shows_tool_errors(page):
    pg = page
    pg.fill("#min-reward", "0.5")
    assert _rows(pg).count() == 3 * 2 * 2 - 1 + 3 * 2  # two of three per group (one is the hostile), two per eval
    pg.fill("#min-reward", "")
    pg.fill("#max-reward", "0.2")
    assert _rows(pg).count() == 3 * 2 + 1 + 3 * 2  # the failed call of each group, the hostile one, two per eval
    pg.fill("#max-reward", "")
    pg.select_option("#outcome", "tool-errors")
    pg.select_option("#source", "rl/1")
    assert _rows(pg).count() == 2
    _rows(pg).first.click()
    call = pg.locator("#traj-detail .tool-call").first
    assert call.locator(".status").inner_text() == "validation_error"
    assert "status-error" in call.locator(".status").get_attribute("class")
    assert "missing required argument 'expression'" in call.locator(".tool-result").inner_text()
    assert pg.locator("#traj-detail .reward-total").inner_text() == "reward 0.100"


def test_characters_split_over_tokens_read_whole(page):
    pg = page
    pg.fill("#search", "résumé")
    assert _rows(pg).count() == 3 * 2 - 1 + 3  # one per group (the hostile replaces one) and one per eval
    _rows(pg).first.click()
    turn = pg.locator("#traj-detail .turn").first
    assert turn.locator(".model-text").inner_text() == UNICODE_TEXT
    assert "".join(turn.locator(".tok").all_inner_texts()) == UNICODE_TEXT + "<|im_end|>"


def test_model_written_html_is_shown_as_text_and_never_runs(page, artifacts):
    pg = page
    pg.fill("#search", "pwned")
    assert _rows(pg).count() == 1
    assert HOSTILE_TASK in _rows(pg).first.inner_text()  # the task id shows its tags as text
    _rows(pg).first.click()
    detail = pg.locator("#traj-detail")
    assert detail.locator(".model-text").first.inner_text() == f"I will print {HOSTILE}"
    assert detail.locator(".tool-result").first.inner_text() == HOSTILE
    assert detail.locator("pre.final").inner_text() == HOSTILE
    assert HOSTILE in "".join(detail.locator(".turn").first.locator(".tok.sampled").all_inner_texts())
    assert pg.evaluate("window.__pwned") is None
    assert pg.locator("#traj-detail img, #traj-detail script").count() == 0
    assert pg.locator("#viewer b", has_text="bold").count() == 0  # the task id's <b> is no element
    assert pg.locator("script").count() == 2
    pg.locator("#trajectories").screenshot(path=str(artifacts / "hostile-trajectory.png"))
