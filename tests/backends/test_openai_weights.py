"""The openai backend over a fleet of servers, with the trainer's weights pushed to every server
(`backend.openai.weight_sync=vllm_files`), over real HTTP against the `fleet` fixture: two loopback
servers speaking vLLM's completions dialect and dev-mode weight API (NOT vLLM; see conftest.py).
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
import torch

from tirl.backends.base import GenerationRequest, SamplingParams
from tirl.backends.fleet import FleetWeights, WeightSyncError, trajectory_of
from tirl.backends.openai import OpenAIBackend, ServerError
from tirl.config import load_config
from tirl.errors import ConfigError
from tirl.trainer.build import check_backend
from tirl.types import Message

PROMPT = (Message("system", "You are a helpful assistant."), Message("user", "What is 17 times 23?"))
FLEET_CFG = ["backend.name=openai", "backend.openai.weight_sync=vllm_files"]
CHUNK_BYTES = 64 << 20
"""Files of at most 64 MiB in the direct tests: the 540 MB float32 model goes out in several."""


def _fleet_backend(urls, tokenizer, weight_dir, **kw) -> OpenAIBackend:
    weights = FleetWeights(urls, str(weight_dir), torch.float32, timeout_s=120, chunk_bytes=CHUNK_BYTES)
    return OpenAIBackend(urls, tokenizer, [tokenizer.eos_token_id], tokenizer.eos_token_id, endpoint="completions",
                         weights=weights, **kw)


def _greedy(backend, fmt, max_new_tokens: int = 12):
    request = GenerationRequest(prompt_ids=tuple(fmt.prompt_ids(list(PROMPT), None)), max_new_tokens=max_new_tokens,
                                sampling=SamplingParams(0.0), key=("probe", 0))
    return asyncio.run(backend.generate(request))


def _on_each_server(fleet, tokenizer, fmt):
    """The greedy completion of PROMPT from every fleet server, asked one server at a time."""
    out = []
    for server in fleet:
        backend = OpenAIBackend(server.base_url, tokenizer, [tokenizer.eos_token_id], tokenizer.eos_token_id,
                                endpoint="completions")
        out.append(_greedy(backend, fmt))
        backend.close()
    return out


def _local(state_dict, smol_dir, tokenizer):
    from tirl.backends.hf import HFBackend
    from tirl.models.loading import load_causal_lm

    model = load_causal_lm(str(smol_dir), torch.float32, "eager", "cpu")
    model.load_state_dict(state_dict)
    return HFBackend(model, tokenizer, [tokenizer.eos_token_id], max_context=2048)


def _perturbed(state_dict) -> dict[str, torch.Tensor]:
    """`state_dict` with noise on the last decoder layer and the final norm (other tensors shared, not copied)."""
    gen = torch.Generator().manual_seed(0)
    last = max(int(k.split(".")[2]) for k in state_dict if k.startswith("model.layers."))
    noisy = [k for k in state_dict if k.startswith((f"model.layers.{last}.", "model.norm."))]
    return {**state_dict, **{k: state_dict[k] + 0.1 * state_dict[k].abs().mean() * torch.randn(
        state_dict[k].shape, generator=gen) for k in noisy}}


def _assert_same(remote, local):
    assert remote.token_ids == local.token_ids and remote.finish_reason == local.finish_reason
    assert remote.logprobs == pytest.approx(local.logprobs, abs=1e-5)


def test_pushed_weights_generate_on_every_server(fleet, smol_model, smol_dir, smol_tokenizer, smol_format, tmp_path):
    """After `update_weights`, greedy completions and log-probs of BOTH servers equal those of a local hf
    backend holding the same weights; the perturbed weights change them."""
    urls = [s.base_url for s in fleet]
    backend = _fleet_backend(urls, smol_tokenizer, tmp_path / "weights")
    original = smol_model.state_dict()
    perturbed = _perturbed(original)
    resets, loads = [s.log.resets for s in fleet], [len(s.log.loads) for s in fleet]

    backend.update_weights(original)
    local = _local(original, smol_dir, smol_tokenizer)
    before = _greedy(local, smol_format)
    local.close()
    for remote in _on_each_server(fleet, smol_tokenizer, smol_format):
        _assert_same(remote, before)

    backend.update_weights(perturbed)
    local = _local(perturbed, smol_dir, smol_tokenizer)
    after = _greedy(local, smol_format)
    local.close()
    assert after.logprobs != pytest.approx(before.logprobs, abs=1e-3)
    for remote in _on_each_server(fleet, smol_tokenizer, smol_format):
        _assert_same(remote, after)

    assert [s.log.resets for s in fleet] == [r + 2 for r in resets]
    files = [len(s.log.loads) - n for s, n in zip(fleet, loads)]
    assert files[0] == files[1] and files[0] >= 2 * 8, files  # every file to every server
    assert not list((tmp_path / "weights").iterdir())  # the files are gone once loaded
    metrics = backend.metrics_since(type(backend.stats)(weight_updates=0))
    assert metrics["gen/weight_updates"] == 2 and metrics["time/weight_sync_s"] > 0
    backend.close()


def test_requests_spread_over_the_fleet_and_trajectories_stay_on_one_server(fleet, smol_tokenizer, smol_format,
                                                                            tmp_path):
    """5 two-turn trajectories, all first turns at once, then all second turns: both servers get some, and
    each trajectory's second turn goes where its first went (an odd count, so that spreading the second
    turns afresh would move some)."""
    backend = _fleet_backend([s.base_url for s in fleet], smol_tokenizer, tmp_path)
    seen = [len(s.log.prompts) for s in fleet]
    firsts = [tuple(smol_format.prompt_ids([Message("user", f"What is {i} plus {i}?")], None)) for i in range(5)]
    again = tuple(smol_tokenizer.encode(" Again.", add_special_tokens=False))

    async def turns(prompts, turn):
        return await asyncio.gather(*[backend.generate(GenerationRequest(
            p, 4, sampling=SamplingParams(1.0), seed=i, key=(i, turn))) for i, p in enumerate(prompts)])

    completions = asyncio.run(turns(firsts, 0))
    seconds = [p + c.token_ids + again for p, c in zip(firsts, completions)]
    asyncio.run(turns(seconds, 1))
    backend.close()
    received = [[tuple(p) for p in s.log.prompts[n:]] for s, n in zip(fleet, seen)]
    assert all(len(r) >= 2 for r in received), [len(r) for r in received]  # both servers were used
    assert sum(len(r) for r in received) == 10
    for first, second in zip(firsts, seconds):
        [server] = [i for i, r in enumerate(received) if first in r]
        assert second in received[server], "a trajectory's second turn went to another server"


def test_the_rollouts_keys_name_trajectories(smol_format):
    """The router's trajectory identity (key without the turn) holds for the real rollout: every request of
    one trajectory shares it, and different trajectories differ."""
    from tirl.backends.scripted import ScriptedBackend
    from tirl.envs.tool_env import ToolEnv
    from tirl.rewards.base import RewardResult
    from tirl.rollout.agent import TurnLimits
    from tirl.rollout.groups import Flat, RolloutContext, RolloutSpec, run_strategy
    from tirl.tasks.base import Problem
    from tirl.tools import ToolSet, calculator

    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>'

    def script(request, turn):
        return call if turn == 0 else "<answer>4</answer><|im_end|>"

    backend = ScriptedBackend(smol_format.tokenizer, script)
    ctx = RolloutContext(lambda p: ToolEnv(p, "Solve it.", ToolSet([calculator])), backend, smol_format,
                         RolloutSpec(group_size=2, limits=TurnLimits(max_turns=3)),
                         lambda t, p, g: RewardResult(1.0, {}, True))
    problems = [Problem("a", "What is 2+2?", "4"), Problem("b", "What is 2+2?", "4")]
    asyncio.run(run_strategy(Flat(), problems, ctx))
    by_trajectory: dict[tuple, list] = {}
    for r in backend.requests:
        by_trajectory.setdefault(trajectory_of(r), []).append(r)
    assert len(by_trajectory) == 4 and all(len(rs) == 2 for rs in by_trajectory.values())
    for first, second in by_trajectory.values():
        assert second.prompt_ids[:len(first.prompt_ids)] == first.prompt_ids


def test_a_server_without_the_dev_mode_endpoints_is_named(completions_server, tmp_path):
    weights = FleetWeights([completions_server.base_url], str(tmp_path), torch.float32, timeout_s=30)
    with pytest.raises(WeightSyncError) as e:
        weights.push({"w": torch.ones(2)})
    root = completions_server.base_url.removesuffix("/v1")
    assert f"{root}/collective_rpc" in str(e.value) and "404" in str(e.value)
    assert "VLLM_SERVER_DEV_MODE=1" in str(e.value) and "tirl.backends.vllm.TirlWorkerExtension" in str(e.value)
    assert not list(tmp_path.iterdir())


def test_an_unreachable_server_is_named(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(WeightSyncError, match=r"127\.0\.0\.1:\d+/collective_rpc: no answer"):
        FleetWeights([url], str(tmp_path), torch.float32, timeout_s=5).push({"w": torch.ones(2)})


def test_weights_the_model_does_not_have_are_an_error_naming_the_server(fleet, tmp_path):
    weights = FleetWeights([fleet[0].base_url], str(tmp_path), torch.float32, timeout_s=30)
    with pytest.raises(WeightSyncError) as e:
        weights.push({"no.such.weight": torch.ones(2)})
    assert f"{fleet[0].base_url.removesuffix('/v1')}/collective_rpc answered HTTP 500" in str(e.value)


def test_a_worker_count_mismatch_is_an_error(fleet, smol_model, tmp_path):
    state = {k: v for k, v in smol_model.state_dict().items() if k.endswith("norm.weight")}  # one small file
    fleet[1].log.worker_results = [len(state), len(state) - 1]  # as if its second worker skipped a tensor
    try:
        weights = FleetWeights([s.base_url for s in fleet], str(tmp_path), torch.float32, timeout_s=120)
        with pytest.raises(WeightSyncError) as e:
            weights.push(state)
    finally:
        fleet[1].log.worker_results = None
    message = str(e.value)
    assert fleet[1].base_url.removesuffix("/v1") in message and "2 workers" in message
    assert f"expected {len(state)} each" in message and fleet[0].base_url.removesuffix("/v1") not in message


def test_a_fleet_must_serve_one_model(fleet, completions_server, smol_tokenizer, smol_format):
    backend = OpenAIBackend([fleet[0].base_url, completions_server.base_url], smol_tokenizer,
                            [smol_tokenizer.eos_token_id], smol_tokenizer.eos_token_id, endpoint="completions")
    with pytest.raises(ServerError, match="serve different models.*smol-fleet.*smol-loopback"):
        _greedy(backend, smol_format)
    backend.close()


def test_tirl_eval_pushes_the_evaluated_model_to_the_fleet(fleet, smol_dir, tmp_path):
    """`tirl eval` with weight sync loads the model here and pushes it before generating on the fleet."""
    from tirl.cli import main

    resets = [s.log.resets for s in fleet]
    run_dir = tmp_path / "run"
    rc = main(["eval", "--model", str(smol_dir), "--task", "arithmetic", *FLEET_CFG,
               f"backend.openai.base_url=[{','.join(s.base_url for s in fleet)}]",
               f"backend.openai.weight_dir={tmp_path / 'weights'}", "eval.size=2", "eval.no_tools=false",
               f"run.dir={run_dir}", "run.tensorboard=false", "rollout.max_turns=2",
               "rollout.max_new_tokens_per_turn=16", "rollout.max_new_tokens=32"])
    assert rc == 0
    assert [s.log.resets for s in fleet] == [r + 1 for r in resets]
    summary = json.loads((run_dir / "eval" / "eval.summary.json").read_text())
    assert summary["problems"] == 2


# ----------------------------------------------------------------------------- configuration and preflight
@pytest.mark.parametrize("overrides, error", [
    (FLEET_CFG, "weight_sync=vllm_files needs backend.openai.weight_dir"),
    (["backend.name=openai", "backend.openai.weight_dir=/tmp/w"], "weight_dir has no effect"),
    (["backend.name=openai", "backend.openai.weight_dtype=float16"], "weight_dtype has no effect"),
    ([*FLEET_CFG, "backend.openai.weight_dir=/tmp/w", "backend.openai.endpoint=chat"], "endpoint=chat"),
    (["backend.name=openai", "backend.openai.base_url=[]"], "base_url"),
    (["backend.name=openai", "backend.openai.base_url=[http://a:1/v1,http://a:1/v1]"], "twice"),
])
def test_weight_sync_settings_are_checked(overrides, error):
    with pytest.raises(ConfigError, match=error):
        load_config(None, overrides)


def test_preflight_allows_rl_with_weight_sync_and_names_it_otherwise():
    cfg = load_config(None, [*FLEET_CFG, "backend.openai.weight_dir=/tmp/w",
                             "backend.openai.base_url=[http://a:1/v1,http://b:2/v1]"])
    assert cfg.backend.openai.base_url == ["http://a:1/v1", "http://b:2/v1"]
    check_backend(cfg)
    with pytest.raises(ConfigError, match="backend.openai.weight_sync=vllm_files"):
        check_backend(load_config(None, ["backend.name=openai"]))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tirl_train_on_the_fleet(fleet, smol_dir, smol_tokenizer, smol_format, tmp_path, monkeypatch):
    """`tirl train` (LoRA) with rollouts on both servers: each gets the starting weights and one push of the
    merged weights per RL step, and ends serving the final saved model (which RL changed)."""
    from tirl.cli import main

    import tirl.backends.fleet

    monkeypatch.setattr(tirl.backends.fleet, "WEIGHT_CHUNK_BYTES", CHUNK_BYTES)  # less memory at once
    resets, prompts = [s.log.resets for s in fleet], [len(s.log.prompts) for s in fleet]
    urls = ",".join(s.base_url for s in fleet)
    run_dir = tmp_path / "run"
    rc = main(["train", *FLEET_CFG, f"backend.openai.base_url=[{urls}]",
               f"backend.openai.weight_dir={tmp_path / 'weights'}", f"model.name={smol_dir}", "model.dtype=float32",
               *TRAIN_2_STEPS, f"run.dir={run_dir}"])
    assert rc == 0
    assert [s.log.resets for s in fleet] == [r + 3 for r in resets]  # 1 at start + 1 per RL step
    assert all(len(s.log.prompts) > n for s, n in zip(fleet, prompts))  # both servers generated rollouts
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rl = [m for m in metrics if m.get("stage") == "rl"]
    assert len(rl) == 2 and all(m["gen/weight_updates"] == 1 for m in rl), rl
    assert all(m["gen/requests"] > 0 for m in rl)

    _assert_every_server_serves(run_dir / "models" / "final", fleet, smol_dir, smol_tokenizer, smol_format)


@pytest.mark.slow
def test_data_parallel_ranks_push_to_the_fleet_once(fleet, smol_dir, smol_tokenizer, smol_format, tmp_path):
    """`torchrun` with two ddp ranks generating on the same fleet: rank 0 alone pushes (the start weights,
    then once per RL step) while the other waits, so each server loads every version once, not once per
    rank, and ends serving the final model."""
    import os
    import subprocess
    import sys

    resets = [s.log.resets for s in fleet]
    urls = ",".join(s.base_url for s in fleet)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "tirl.cli", "train", *FLEET_CFG, f"backend.openai.base_url=[{urls}]",
           f"backend.openai.weight_dir={tmp_path / 'weights'}", f"model.name={smol_dir}", "model.dtype=float32",
           *TRAIN_2_STEPS, "distributed.strategy=ddp", f"run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert [s.log.resets for s in fleet] == [r + 3 for r in resets]  # not r + 6: one push per version
    rl = [m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if m.get("stage") == "rl"]
    assert len(rl) == 2 and all(m["gen/weight_updates"] == 1 for m in rl), rl

    _assert_every_server_serves(run_dir / "models" / "final", fleet, smol_dir, smol_tokenizer, smol_format)


TRAIN_2_STEPS = [
    "model.lora.enabled=true", "model.lora.target_modules=[q_proj,v_proj]",  # merged weights pushed
    "rl.optim.lr=1e-3", "rl.optim.warmup_steps=0",
    # rewards that differ within a group (by length: the untrained model rarely answers right)
    "task.reward=dapo_overlong", "task.reward_kwargs={max_length: 48, cache_length: 44}",
    "pipeline.eval_before=false", "pipeline.sft=false", "pipeline.eval_after_sft=false", "pipeline.eval_after=false",
    "rl.steps=2", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_turns=2",
    "rollout.max_new_tokens_per_turn=24", "rollout.max_new_tokens=48", "run.tensorboard=false"]
"""Two LoRA RL steps whose rewards vary (what the end-to-end fleet tests train)."""


def _assert_every_server_serves(final_dir, fleet, start_dir, tokenizer, fmt) -> None:
    """The saved model differs from the start (else the check says nothing), and every server's greedy
    tokens and log-probs are those of a local backend with it."""
    from tirl.backends.hf import HFBackend
    from tirl.models.loading import load_causal_lm

    final = load_causal_lm(str(final_dir), torch.float32, "eager", "cpu")
    assert _changed_tensors(final, start_dir) > 0, "RL left the weights as they were: the check below says nothing"
    local = HFBackend(final, tokenizer, [tokenizer.eos_token_id], max_context=2048)
    expected = _greedy(local, fmt)
    local.close()
    for remote in _on_each_server(fleet, tokenizer, fmt):
        assert remote.token_ids == expected.token_ids
        assert remote.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def _changed_tensors(model, start_dir) -> int:
    """How many of `model`'s tensors differ from those saved in `start_dir` (read one at a time)."""
    from safetensors import safe_open

    state, changed = model.state_dict(), 0
    for path in sorted(start_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            changed += sum(not torch.equal(f.get_tensor(k).float(), state[k]) for k in f.keys() if k in state)
    return changed
