"""The openai backend beyond the shared behaviour suite: endpoint choice, token exactness over HTTP,
errors that name the server, preflight refusals, and `tirl eval` end to end against `transformers serve`.

Servers: `transformers_server` (third-party) and `completions_server` (tirl's hf backend behind
vLLM's HTTP dialect; not third-party), both from conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket

import pytest

from tirl.backends.base import GenerationRequest, SamplingParams
from tirl.backends.openai import OpenAIBackend, ServerError
from tirl.config import Config
from tirl.errors import ConfigError
from tirl.trainer.build import check_backend
from tirl.types import Message

MESSAGES = (Message("system", "You are a helpful assistant."), Message("user", "Tell me about owls."))


def _backend(server, tokenizer, **kw) -> OpenAIBackend:
    return OpenAIBackend(server.base_url, tokenizer, [tokenizer.eos_token_id], tokenizer.eos_token_id, **kw)


def _request(fmt, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_ids=tuple(fmt.prompt_ids(list(MESSAGES), None)), messages=MESSAGES, **kw)


def test_auto_picks_chat_on_transformers_serve(transformers_server, smol_tokenizer, smol_format):
    """`transformers serve` takes only string prompts on /v1/completions: auto falls back to chat, whose
    turns are text-level (ids from the policy tokenizer, log-probs unknown)."""
    backend = _backend(transformers_server, smol_tokenizer)
    c = asyncio.run(backend.generate(_request(smol_format, max_new_tokens=8)))
    assert backend.endpoint == "chat" and backend.model == transformers_server.model
    assert len(c.logprobs) == len(c.token_ids) and all(math.isnan(lp) for lp in c.logprobs)
    assert backend.metrics_since(type(backend.stats)())["gen/unknown_logprobs"] == len(c.token_ids)
    backend.close()


def test_completions_on_transformers_serve_is_refused_naming_the_server(transformers_server, smol_tokenizer,
                                                                         smol_format):
    backend = _backend(transformers_server, smol_tokenizer, endpoint="completions")
    with pytest.raises(ServerError) as e:
        asyncio.run(backend.generate(_request(smol_format, max_new_tokens=4)))
    assert transformers_server.base_url in str(e.value) and "HTTP 4" in str(e.value)
    backend.close()


def test_completions_path_is_token_exact_over_http(completions_server, smol_model, smol_tokenizer, smol_format):
    """Sampled ids and log-probs through HTTP equal those of the same hf engine in-process."""
    from tirl.backends.hf import HFBackend

    backend = _backend(completions_server, smol_tokenizer)
    local = HFBackend(smol_model, smol_tokenizer, [smol_tokenizer.eos_token_id], max_context=2048)
    request = _request(smol_format, max_new_tokens=16, sampling=SamplingParams(1.0), seed=7)
    remote, mine = asyncio.run(backend.generate(request)), asyncio.run(local.generate(request))
    local.close()
    assert backend.endpoint == "completions"
    assert remote.token_ids == mine.token_ids and remote.finish_reason == mine.finish_reason
    assert remote.logprobs == pytest.approx(mine.logprobs, abs=1e-5)
    backend.close()


def test_text_pieces_give_ids_only_when_each_names_one_vocabulary_entry(completions_server, smol_tokenizer):
    backend = _backend(completions_server, smol_tokenizer)
    ids = smol_tokenizer.encode("The owl hunts at night.", add_special_tokens=False)
    pieces = [smol_tokenizer.decode([i]) for i in ids]
    assert backend._ids_from_pieces(pieces) == ids
    assert backend._ids_from_pieces([*pieces, "no such vocabulary entry at all"]) is None


def test_unreachable_server_is_an_error_naming_url_and_model(smol_tokenizer, smol_format):
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    backend = OpenAIBackend(url, smol_tokenizer, [2], 2, model="some-model", max_retries=0, request_timeout_s=5)
    with pytest.raises(ServerError) as e:
        asyncio.run(backend.generate(_request(smol_format, max_new_tokens=4)))
    assert url in str(e.value) and "some-model" in str(e.value) and "cannot connect" in str(e.value)


def test_update_weights_is_refused(smol_tokenizer):
    backend = OpenAIBackend("http://127.0.0.1:9/v1", smol_tokenizer, [2], 2, model="m")
    with pytest.raises(ConfigError, match="tirl eval"):
        backend.update_weights({})


@pytest.mark.parametrize("overrides, error", [
    ({}, "cannot receive the weights"),
    ({"pipeline": {"sft": False}}, "cannot receive the weights"),
    ({"backend": {"name": "openai", "openai": {"endpoint": "chat"}}}, "evaluation only"),
])
def test_preflight_refuses_training_with_the_openai_backend(overrides, error):
    base = {"backend": {"name": "openai"}}
    cfg = Config.model_validate({**base, **overrides})
    with pytest.raises(ConfigError, match=error):
        check_backend(cfg)


def test_preflight_allows_evaluation_with_the_openai_backend():
    cfg = Config.model_validate({"backend": {"name": "openai"}, "pipeline": {
        "sft": False, "rl": False, "eval_after_sft": False, "eval_after": False}})
    check_backend(cfg)


def test_tirl_eval_through_transformers_serve(transformers_server, smol_dir, tmp_path, monkeypatch):
    """`tirl eval` with backend.name=openai runs the held-out problems through the server end to end,
    without loading the weights here (the server holds them)."""
    from tirl.cli import main
    from tirl.models import loading
    from tirl.rollout.io import read_jsonl

    def no_weights(*args, **kwargs):
        raise AssertionError("the policy's weights were loaded although the server generates")

    monkeypatch.setattr(loading, "load_causal_lm", no_weights)

    run_dir = tmp_path / "run"
    rc = main(["eval", "--model", str(smol_dir), "--task", "arithmetic", "backend.name=openai",
               f"backend.openai.base_url={transformers_server.base_url}", "eval.size=2", "eval.no_tools=false",
               f"run.dir={run_dir}", "run.tensorboard=false", "rollout.max_turns=2"])
    assert rc == 0
    summary = json.loads((run_dir / "eval" / "eval.summary.json").read_text())
    assert summary["problems"] == 2 and summary["samples"] == 2
    trajs = list(read_jsonl(run_dir / "eval" / "eval.jsonl"))
    assert len(trajs) == 2 and all(t.meta.error is None for t in trajs), [t.meta.error for t in trajs]
    assert all(t.turns and sum(t.loss_mask) > 0 for t in trajs)


def test_fission_judge_on_a_server_diagnoses_the_failed_call(transformers_server, smol_format):
    """rollout.fission.judge=server: the judge model behind `transformers serve` writes the diagnosis
    that follows the tool's real error in the recovery rollouts' prompt."""

    from tirl.backends.scripted import ScriptedBackend
    from tirl.envs.tool_env import ToolEnv
    from tirl.rewards.base import RewardResult
    from tirl.rollout.agent import TurnLimits
    from tirl.rollout.fission import Fission
    from tirl.rollout.groups import RolloutContext, RolloutSpec, run_strategy
    from tirl.tasks.base import Problem
    from tirl.tools import ToolSet, calculator

    failing = '<tool_call>{"name": "calculator", "arguments": {"expression": "1/0"}}</tool_call>'

    def script(request, turn):  # the policy: sample 0 divides by zero, then answers wrong; the others answer
        if request.key[0] == "fission" or request.key[1] != 0:
            return "<answer>5555</answer><|im_end|>"
        return failing if turn == 0 else "<answer>1</answer><|im_end|>"

    def reward(traj, problem, group):
        correct = traj.final_answer == "<answer>5555</answer>"
        return RewardResult(float(correct), {}, correct)

    ctx = RolloutContext(lambda p: ToolEnv(p, "Solve it.", ToolSet([calculator])),
                         ScriptedBackend(smol_format.tokenizer, script), smol_format,
                         RolloutSpec(group_size=2, limits=TurnLimits(max_turns=3)), reward)
    strategy = Fission(judge="server", judge_base_url=transformers_server.base_url, judge_max_tokens=24)
    out = asyncio.run(run_strategy(strategy, [Problem("p", "What is 1234+4321?", "5555")], ctx))
    [recovery] = [g for g in out.groups if any(t.meta.origin for t in g.trajectories)]
    prompt = smol_format.decode(recovery.trajectories[0].prompt_ids)
    error = "Error: ValueError: division by zero\nDiagnosis: "
    assert error in prompt, prompt[-400:]
    diagnosis = prompt.split(error)[1].split("<|im_end|>")[0]
    assert diagnosis.strip() and out.metrics["fission/judge_leaks"] == 0
    assert not any(r.key[0] == "fission-judge" for r in ctx.backend.requests)  # the policy was not asked
    assert strategy._judge_backend.stats.requests == 1


def test_fission_judge_settings_are_checked():
    from tirl.config import load_config

    with pytest.raises(ConfigError, match="judge=server needs judge_base_url"):
        load_config(None, ["rollout.strategy=fission", "rollout.fission.judge=server"])
    with pytest.raises(ConfigError, match="judge_base_url/judge_model are set but judge=policy"):
        load_config(None, ["rollout.strategy=fission", "rollout.fission.judge=policy",
                           "rollout.fission.judge_base_url=http://127.0.0.1:1/v1"])
