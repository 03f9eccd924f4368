"""LLM-judge rewards: judge_rubric (RetouchIQ-style, reference 3.8) and cm2_checklist (CM2, reference 3.5).

Exact values come from scripted judges; the `Judge` itself is exercised through tirl backends: the
scripted backend, the hf backend on the tiny random model (determinism at temperature 0, the failure
path), and the openai backend against a small HTTP server (and a closed port: transport errors raise).
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tirl.backends.base import SamplingParams
from tirl.backends.openai import ServerError
from tirl.backends.scripted import ScriptedBackend
from tirl.rewards.judge import (Judge, close_judges, get_judge, parse_checklists, parse_score, parse_verdicts,
                                rubric_messages)
from tirl.types import Message, ToolStatus

from tests.rewards.builders import ScriptedJudge, Step, problem, run, trajectory

ANSWER = trajectory("<answer>42</answer>")


def rubric(judge, traj=ANSWER, prob=None, **kw):
    return run({"name": "judge_rubric", "kwargs": {"judge": judge, **kw}}, traj, prob)


def checklist(judge, traj, prob, **kw):
    return run({"name": "cm2_checklist", "kwargs": {"judge": judge, **kw}}, traj, prob)


@pytest.fixture(autouse=True)
def _release_judges():
    yield
    close_judges()


# --- parse_score ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("Score: 7", 7.0), ("The response is fine.\nscore = 8/10", 8.0), ("**Score:** 10", 10.0),
    ("Score (0-10): 3", 3.0), ("<score>6.5</score>", 6.5), ("Score: 2\nOn reflection, Score: 9", 9.0),
    ("score: 0", 0.0),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text", ["", "Looks good to me.", "Score: 11", "Score: -3", "7", "<score>x</score>"])
def test_unreadable_scores_are_none(text):
    assert parse_score(text) is None


# --- judge_rubric with a scripted judge -------------------------------------------------------

def test_judge_rubric_writes_a_rubric_then_scores():
    judge = ScriptedJudge(["1. The answer is 42.", "It is 42 as required.\nScore: 7"])
    r = rubric(judge)
    assert r.total == pytest.approx(0.7)
    assert r.components == {"score": pytest.approx(0.7), "judge_failed": 0.0, "no_answer": 0.0}
    assert r.correct is None
    (rubric_msgs, _), (score_msgs, score_key) = judge.asked
    assert "What is 6 * 7?" in rubric_msgs[-1].content and "Reference answer:\n42" in rubric_msgs[-1].content
    assert "Rubric:\n1. The answer is 42." in score_msgs[-1].content
    assert "Response:\n<answer>42</answer>" in score_msgs[-1].content
    assert score_key[:2] == ("score", "p0")


def test_the_rubric_is_written_once_per_problem():
    judge = ScriptedJudge(["a rubric", "Score: 4", "Score: 9"])
    judge.rubrics = {}
    assert rubric(judge).total == pytest.approx(0.4)
    assert rubric(judge, trajectory("<answer>41</answer>", sample_index=1)).total == pytest.approx(0.9)
    assert len(judge.asked) == 3


def test_without_reference_the_rubric_writer_does_not_see_the_answer():
    msgs = rubric_messages(problem(), with_reference=False)
    assert "42" not in msgs[-1].content
    judge = ScriptedJudge(["a rubric", "Score: 5"])
    rubric(judge, with_reference=False)
    assert "Reference answer" not in judge.asked[0][0][-1].content


@pytest.mark.parametrize("answers", [["a rubric", "I like it."], ["a rubric", "Score: 12"], ["", "Score: 5"]])
def test_malformed_judge_output_scores_zero_and_is_counted(answers):
    judge = ScriptedJudge(list(answers))
    judge.rubrics = {}
    r = rubric(judge)
    assert r.total == 0.0
    assert r.components["judge_failed"] == 1.0
    if answers[0] == "":
        assert len(judge.asked) == 1 and judge.rubrics == {}  # no scoring, and no empty rubric kept


def test_no_final_answer_scores_zero_without_asking():
    judge = ScriptedJudge([])
    r = rubric(judge, trajectory("thinking", answered=False), correct_threshold=0.5)
    assert r.total == 0.0 and r.components["no_answer"] == 1.0 and r.correct is False
    assert judge.asked == []


def test_correct_threshold_and_max_score():
    assert rubric(ScriptedJudge(["r", "Score: 8"]), correct_threshold=0.8).correct is True
    assert rubric(ScriptedJudge(["r", "Score: 7"]), correct_threshold=0.8).correct is False
    assert rubric(ScriptedJudge(["r", "Score: 3"]), max_score=4).total == pytest.approx(0.75)


def test_transcript_view_shows_tool_calls_and_results():
    traj = trajectory(Step("let me compute", calls=[("calculator", {"e": "6*7"})], outputs=["42"]),
                      "<answer>42</answer>")
    judge = ScriptedJudge(["r", "Score: 10"])
    assert rubric(judge, traj, view="transcript").total == 1.0
    shown = judge.asked[1][0][-1].content
    assert "ASSISTANT (step 1): let me compute" in shown and "TOOL calculator (ok): 42" in shown
    assert "ASSISTANT (step 2): <answer>42</answer>" in shown


def test_transport_errors_raise():
    class Down:
        async def ask(self, messages, key=()):
            raise ServerError("openai backend, POST /chat/completions: cannot connect", answered=False)

    with pytest.raises(ServerError, match="cannot connect"):
        rubric(Down())


@pytest.mark.parametrize(("judge", "message"), [
    (None, "needs a `judge`"), ("hf", "mapping of judge settings"), ({"backend": "hf", "modle": "x"}, "modle"),
    ({"backend": "openai"}, "needs base_url"), ({"backend": "tgi"}, "backend"),
    ({"temperature": -1}, "temperature"),
])
def test_bad_judge_settings_name_the_problem(judge, message):
    with pytest.raises(ValueError, match=message):
        rubric(judge)


def test_bad_view_is_an_error():
    with pytest.raises(ValueError, match="view"):
        rubric(ScriptedJudge([]), view="everything")


# --- the Judge class through tirl backends ----------------------------------------------------

def test_judge_renders_with_the_chat_format_and_strips_the_end_of_turn(smol_format):
    seen = []

    def script(request, turn):
        seen.append(request)
        return "Fine.\nScore: 9" + smol_format.eos_text

    judge = Judge(ScriptedBackend(smol_format.tokenizer, script), smol_format, max_new_tokens=32)
    judge.rubrics["p0", "What is 6 * 7?", "42"] = "a kept rubric"
    r = rubric(judge)
    assert r.total == pytest.approx(0.9)
    request = seen[0]
    assert request.prompt_ids == tuple(smol_format.prompt_ids(list(request.messages), None))
    assert request.sampling.temperature == 0.0 and request.max_new_tokens == 32
    assert "a kept rubric" in request.messages[-1].content
    text = asyncio.run(judge.ask([Message("user", "hi")], ("k",)))
    assert text == "Fine.\nScore: 9"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_hf_judge_is_deterministic_and_fails_softly(tiny_model_dir, temperature):
    """The tiny random model writes noise (at temperature 0: newlines only, an empty answer). The same
    request gets the same text from two separately built judges (greedy, or sampling seeded by the
    request key), and never a score: the reward is 0 with judge_failed = 1, the same both times."""
    cfg = {"backend": "hf", "model": str(tiny_model_dir), "max_new_tokens": 24, "device": "cpu",
           "temperature": temperature, "seed": 3}
    judge = get_judge(cfg)
    assert get_judge(dict(cfg)) is judge
    messages = [Message("system", "You grade."), Message("user", "Task: 6 * 7. Response: 42. Score it.")]
    first = asyncio.run(judge.ask(messages, ("a",)))
    r1 = rubric(cfg)
    close_judges()
    again = get_judge(cfg)
    assert again is not judge
    assert asyncio.run(again.ask(messages, ("a",))) == first
    r2 = rubric(cfg)
    assert (r1.total, r1.components) == (r2.total, r2.components)
    assert r1.total == 0.0 and r1.components["judge_failed"] == 1.0
    if temperature > 0:
        assert first and asyncio.run(again.ask(messages, ("b",))) != first  # real text; another key, another sample


class _ChatServer(BaseHTTPRequestHandler):
    """Answers every chat completion with the text in `self.server.reply`; records the requests."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        answer = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": self.server.replies.pop(0)}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_judge_over_http():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatServer)
    server.replies, server.requests = ["1. says 42", "Good.\nScore: 6"], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = {"backend": "openai", "base_url": f"http://127.0.0.1:{server.server_port}/v1", "model": "judge-m",
               "max_new_tokens": 40, "max_retries": 0}
        r = rubric(cfg)
    finally:
        server.shutdown()
    assert r.total == pytest.approx(0.6) and r.components["judge_failed"] == 0.0
    first, second = server.requests
    assert first["model"] == "judge-m" and first["temperature"] == 0.0 and first["max_tokens"] == 40
    assert first["messages"][0]["role"] == "system" and "Rubric:\n1. says 42" in second["messages"][-1]["content"]


def test_openai_judge_that_cannot_connect_raises():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens there
    cfg = {"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "model": "m", "max_retries": 0,
           "request_timeout_s": 5}
    with pytest.raises(ServerError, match="cannot connect"):
        rubric(cfg)


# --- cm2_checklist ----------------------------------------------------------------------------

CHECKLIST = [{"description": "states the product", "weight": 0.5}, {"description": "shows working", "weight": 0.3},
             {"description": "uses the calculator", "weight": 0.2, "evidence": "a tool call", "focus_on": "tools"}]
TWO_STEPS = trajectory(Step("calling", calls=[("calculator", {"e": "6*7"})], outputs=["42"]), "<answer>42</answer>")


def test_cm2_reference_value_turn_level():
    """Reference 3.5: weights [0.5, 0.3, 0.2], criteria 1 and 3 met, max_turns 2 -> 0.7 / 1 / 2 = 0.35 on the
    last turn. Criterion 1 is met at step 1, criterion 3 at step 2."""
    judge = ScriptedJudge(["1: yes\n2: no\n3: no", "2: no\n3: yes"])
    r = checklist(judge, TWO_STEPS, problem(info={"checklist": CHECKLIST}), max_turns=2)
    assert r.total == pytest.approx(0.35)
    assert r.turn_rewards == pytest.approx((0.0, 0.35))
    assert r.components == pytest.approx({"checklist": 0.35, "criteria_met": 2 / 3, "judge_failed": 0.0})
    second = judge.asked[1][0][-1].content
    assert "1. states the product" not in second  # a satisfied criterion is not asked again
    assert "2. shows working" in second and "3. uses the calculator (evidence: a tool call; focus on: tools)" in second
    first = judge.asked[0][0][-1].content
    assert "ASSISTANT (step 1): calling" in first and "step 2" not in first
    assert "TOOL calculator (ok): 42" in first


def test_cm2_step_level_credits_the_turn_that_first_satisfied_each_criterion():
    """Criterion 1 (0.5 / 2 = 0.25) at step 1, criterion 3 (0.2 / 2 = 0.1) at step 2."""
    judge = ScriptedJudge(["1: yes\n2: no\n3: no", "2: no\n3: yes"])
    r = checklist(judge, TWO_STEPS, problem(info={"checklist": CHECKLIST}), max_turns=2, reward_level="step")
    assert r.turn_rewards == pytest.approx((0.25, 0.1))
    assert r.total == pytest.approx(0.35)


def test_cm2_stops_asking_once_everything_is_met():
    judge = ScriptedJudge(["1: yes\n2: yes\n3: yes"])
    r = checklist(judge, TWO_STEPS, problem(info={"checklist": CHECKLIST}))
    assert r.total == pytest.approx(1.0) and len(judge.asked) == 1


def test_cm2_unreadable_verdict_stops_judging_and_keeps_earlier_credit():
    judge = ScriptedJudge(["1: yes\n2: no\n3: no", "I am not sure."])
    r = checklist(judge, TWO_STEPS, problem(info={"checklist": CHECKLIST}))
    assert r.total == pytest.approx(0.5)
    assert r.components["judge_failed"] == 1.0


def test_cm2_weights_are_normalised_per_checklist_and_divided_by_their_number():
    """Checklists [a] and [b (1), c (3)]: a = 1/2, b = 1/4/2, c = 3/4/2; b and c met -> 0.5."""
    info = {"checklist": [["a"], [{"description": "b", "weight": 1}, {"description": "c", "weight": 3}]]}
    weights = [c.weight for c in parse_checklists(info["checklist"], "p", 1)]
    assert weights == pytest.approx([0.5, 0.125, 0.375])
    judge = ScriptedJudge(["1: no\n2: yes\n3: yes"])
    assert checklist(judge, trajectory("<answer>42</answer>"), problem(info=info)).total == pytest.approx(0.5)


def test_parse_verdicts():
    assert parse_verdicts("1: yes\n2. No\n**3**: true", [1, 2, 3]) == {1: True, 2: False, 3: True}
    assert parse_verdicts("Criterion 2 - yes", [2]) == {2: True}
    assert parse_verdicts("1: yes", [1, 2]) is None


@pytest.mark.parametrize(("info", "message"), [
    ({}, "no info"), ({"checklist": []}, "non-empty list"), ({"checklist": "be good"}, "non-empty list"),
    ({"checklist": [{"weight": 1}]}, "description"), ({"checklist": [{"description": "a", "weight": -1}]}, "weight"),
    ({"checklist": [{"description": "a", "weight": 0}]}, "positive total weight"),
])
def test_cm2_bad_checklists_name_the_problem(info, message):
    with pytest.raises(ValueError, match=message):
        checklist(ScriptedJudge([]), TWO_STEPS, problem(info=info))


@pytest.mark.parametrize(("kwargs", "message"), [({"reward_level": "episode"}, "reward_level"),
                                                 ({"max_turns": 0}, "max_turns")])
def test_cm2_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        checklist(ScriptedJudge([]), TWO_STEPS, problem(info={"checklist": CHECKLIST}), **kwargs)


def test_judge_sampling_is_seeded_by_the_request_key(smol_format):
    """Two requests with different keys get different seeds; the same key the same seed."""
    seeds = []

    def script(request, turn):
        seeds.append(request.seed)
        return "Score: 1"

    judge = Judge(ScriptedBackend(smol_format.tokenizer, script), smol_format,
                  sampling=SamplingParams(temperature=1.0))
    for key in (("a",), ("b",), ("a",)):
        asyncio.run(judge.ask([Message("user", "x")], key))
    assert seeds[0] == seeds[2] != seeds[1]


def test_tool_status_appears_in_the_transcript():
    traj = trajectory(Step("bad", calls=[("calculator", {})], statuses=[ToolStatus.EXECUTION_ERROR],
                           outputs=["division by zero"]), "<answer>0</answer>")
    judge = ScriptedJudge(["r", "Score: 0"])
    rubric(judge, traj, view="transcript")
    assert "TOOL calculator (execution_error): division by zero" in judge.asked[1][0][-1].content
