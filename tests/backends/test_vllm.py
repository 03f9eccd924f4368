"""The vllm backend against a fake `vllm` module (vLLM itself needs CUDA and is not installed here).

The fake follows the shapes vLLM documents (v0.11, pages under https://docs.vllm.ai/en/v0.11.2/):
- `SamplingParams` (api/vllm/sampling_params/): n, temperature, top_p, seed, stop, stop_token_ids,
  include_stop_str_in_output, max_tokens, logprobs, detokenize, skip_special_tokens, output_kind.
- `RequestOutputKind` (same page): CUMULATIVE, DELTA, FINAL_ONLY.
- `TokensPrompt` (api/vllm/inputs/data/): a TypedDict, so calling it builds {"prompt_token_ids": [...]}.
- `RequestOutput` / `CompletionOutput` (api/vllm/outputs/): request_id, prompt_token_ids, outputs,
  finished; index, text, token_ids, cumulative_logprob, logprobs, finish_reason ("stop" | "length" |
  "abort"), stop_reason (None for eos, the token id of a `stop_token_ids` hit, the stop string).
- `Logprob` (api/vllm/logprobs/): logprob, rank, decoded_token; sample logprobs are
  list[dict[token_id, Logprob]], one dict per generated token, holding at least the sampled token.
- `AsyncLLM` (api/vllm/v1/engine/async_llm/; `vllm.AsyncLLMEngine`): from_engine_args,
  async-generator generate(prompt, sampling_params, request_id), async collective_rpc(method, timeout,
  args, kwargs) returning one result per worker, async reset_prefix_cache(), shutdown().
- Worker extensions (engine argument `worker_extension_cls`, examples/offline_inference/rlhf_utils.py):
  the class is mixed into the worker, whose model is `self.model_runner.model` with
  `load_weights(weights: Iterable[tuple[str, Tensor]])`.
"""

from __future__ import annotations

import asyncio
import enum
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tirl.backends import vllm as vb
from tirl.backends.base import Completion, GenerationRequest, SamplingParams
from tirl.errors import ConfigError

EOS = 2
TURN_END = 7


# ---------------------------------------------------------------------------------------------------
# The fake vllm module


class RequestOutputKind(enum.Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


def reply(tokens, finish="stop", stop_reason=None, lp=lambda i: -0.1 * (i + 1), extra=None) -> list:
    """What the fake model answers: tokens, their logprob dicts (plus `extra` entries), finish, stop_reason."""
    entries = [{t: Logprob(lp(i), rank=1)} | (extra or {}) for i, t in enumerate(tokens)]
    return [list(tokens), entries, finish, stop_reason]


class FakeModel:
    """vLLM's model inside a worker: `load_weights` records what it was given."""

    def __init__(self, loaded: dict):
        self.loaded = loaded

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loaded[name] = tensor.clone()
        return set(self.loaded)


class FakeWorkerBase:
    def __init__(self):
        self.loaded: dict[str, torch.Tensor] = {}
        self.model_runner = types.SimpleNamespace(model=FakeModel(self.loaded))


class FakeAsyncLLM:
    """Records every call; answers requests with `FakeVLLM.respond(prompt_ids, params)`."""

    def __init__(self, fake: FakeVLLM, engine_args):
        self.fake = fake
        self.engine_args = engine_args
        extension = engine_args.kwargs.get("worker_extension_cls")
        bases = (FakeWorkerBase,)
        if extension:
            module, _, name = extension.rpartition(".")
            bases = (getattr(sys.modules[module], name), FakeWorkerBase)
        worker_cls = type("Worker", bases, {})
        self.workers = [worker_cls() for _ in range(engine_args.kwargs.get("tensor_parallel_size", 1))]
        self.events: list[Any] = []
        self.requests: list[tuple[Any, FakeSamplingParams, str]] = []
        self.finished_order: list[str] = []
        self.loops: set[int] = set()

    @classmethod
    def from_engine_args(cls, engine_args):
        engine = cls(FakeVLLM.current, engine_args)
        FakeVLLM.current.engines.append(engine)
        return engine

    async def generate(self, prompt, sampling_params, request_id):
        self.loops.add(id(asyncio.get_running_loop()))
        self.requests.append((prompt, sampling_params, request_id))
        tokens, entries, finish, stop_reason = self.fake.respond(prompt["prompt_token_ids"], sampling_params)
        await asyncio.sleep(self.fake.delay(prompt["prompt_token_ids"]))
        self.finished_order.append(request_id)
        out = CompletionOutput(0, "", tokens, None, entries, finish, stop_reason)
        yield RequestOutput(request_id, list(prompt["prompt_token_ids"]), [out], True)

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.events.append(("collective_rpc", method, args))
        if isinstance(method, str):
            return [getattr(w, method)(*args, **(kwargs or {})) for w in self.workers]
        return [method(w, *args, **(kwargs or {})) for w in self.workers]

    async def reset_prefix_cache(self):
        self.events.append("reset_prefix_cache")
        return True

    def shutdown(self):
        self.events.append("shutdown")


@dataclass
class FakeVLLM:
    """State of one fake installation; `module` is what goes into sys.modules["vllm"]."""

    respond: Any = None
    delay: Any = lambda prompt: 0.0
    engines: list[FakeAsyncLLM] = field(default_factory=list)
    current = None

    def __post_init__(self):
        FakeVLLM.current = self
        self.respond = self.respond or (lambda prompt, params: reply([11, 12, EOS]))
        mod = types.ModuleType("vllm")
        mod.__version__ = "0.11.0"
        mod.SamplingParams = FakeSamplingParams
        mod.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
        mod.AsyncEngineArgs = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)
        mod.AsyncLLMEngine = FakeAsyncLLM
        sub = types.ModuleType("vllm.sampling_params")
        sub.RequestOutputKind = RequestOutputKind
        self.module, self.sampling_module = mod, sub

    @property
    def engine(self) -> FakeAsyncLLM:
        return self.engines[-1]


@pytest.fixture
def fake(monkeypatch) -> FakeVLLM:
    f = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", f.module)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", f.sampling_module)
    return f


ENGINE_ARGS = dict(model="m", worker_extension_cls=vb.WORKER_EXTENSION, tensor_parallel_size=1)


@pytest.fixture
def backend(fake, smol_tokenizer):
    b = vb.VLLMBackend(fake.module, dict(ENGINE_ARGS), [EOS, TURN_END], max_context=64,
                       weight_dtype=torch.bfloat16, tokenizer=smol_tokenizer)
    yield b
    b.close()


def req(prompt=(1, 5, 9), max_new=8, stop=(), temperature=1.0, top_p=1.0, seed=0, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(prompt), max_new, tuple(stop), SamplingParams(temperature, top_p), seed, **kw)


# ---------------------------------------------------------------------------------------------------
# Requests -> vLLM


def test_request_maps_to_documented_sampling_params_and_tokens_prompt(fake, backend):
    asyncio.run(backend.generate(req(max_new=5, stop=("</tool_call>",), temperature=0.7, seed=123)))
    prompt, params, request_id = fake.engine.requests[0]
    assert prompt == {"prompt_token_ids": [1, 5, 9]}
    assert params == FakeSamplingParams(
        n=1, temperature=0.7, top_p=1.0, seed=123, stop=["</tool_call>"], stop_token_ids=[EOS, TURN_END],
        include_stop_str_in_output=True, max_tokens=5, logprobs=0, detokenize=True, skip_special_tokens=False,
        output_kind=RequestOutputKind.FINAL_ONLY)
    assert isinstance(request_id, str)


def test_without_stop_strings_nothing_is_detokenized(fake, backend):
    asyncio.run(backend.generate(req(temperature=0.0)))
    params = fake.engine.requests[0][1]
    assert params.stop == [] and params.detokenize is False and params.temperature == 0.0


def test_budget_is_cut_to_the_context_and_an_empty_budget_skips_the_engine(fake, backend):
    asyncio.run(backend.generate(req(prompt=range(60), max_new=10)))
    assert fake.engine.requests[0][1].max_tokens == 4
    out = asyncio.run(backend.generate(req(prompt=range(64), max_new=10)))
    assert out == Completion((), (), "length") and len(fake.engine.requests) == 1


def test_top_p_below_one_is_refused_when_sampling_but_not_when_greedy(fake, backend):
    with pytest.raises(ValueError, match=r"top_p=0.9 .*untruncated"):
        asyncio.run(backend.generate(req(top_p=0.9)))
    asyncio.run(backend.generate(req(top_p=0.9, temperature=0.0)))
    assert fake.engine.requests[0][1].top_p == 0.9


def test_entropies_are_refused(backend):
    with pytest.raises(NotImplementedError, match="entropies"):
        asyncio.run(backend.generate(req(want_entropies=True)))


# ---------------------------------------------------------------------------------------------------
# vLLM outputs -> Completion


def test_eos_finish_keeps_the_eos_token_and_its_logprob(fake, backend):
    fake.respond = lambda p, s: reply([11, 12, EOS], "stop", None)
    out = asyncio.run(backend.generate(req()))
    assert out == Completion((11, 12, EOS), (-0.1, -0.2, pytest.approx(-0.3)), "eos")


def test_a_stop_token_id_hit_is_eos(fake, backend):
    fake.respond = lambda p, s: reply([11, TURN_END], "stop", TURN_END)
    assert asyncio.run(backend.generate(req())).finish_reason == "eos"


def test_length_finish(fake, backend):
    fake.respond = lambda p, s: reply([11, 12, 13], "length", None)
    out = asyncio.run(backend.generate(req(max_new=3)))
    assert out.finish_reason == "length" and out.token_ids == (11, 12, 13)


def test_stop_string_keeps_the_completing_token_and_cuts_what_follows(fake, backend, smol_tokenizer):
    head = smol_tokenizer.encode("x = 1", add_special_tokens=False)
    stop = smol_tokenizer.encode("</tool_call>", add_special_tokens=False)
    tail = smol_tokenizer.encode(" more", add_special_tokens=False)
    fake.respond = lambda p, s: reply(head + stop + tail, "stop", "</tool_call>")
    out = asyncio.run(backend.generate(req(max_new=40, stop=("</tool_call>",))))
    n = len(head) + len(stop)
    assert out.finish_reason == "stop" and out.token_ids == tuple(head + stop)
    assert out.logprobs == tuple(pytest.approx(-0.1 * (i + 1)) for i in range(n))
    assert smol_tokenizer.decode(out.token_ids).endswith("</tool_call>")


def test_logprob_is_read_for_the_sampled_token_among_several(fake, backend):
    fake.respond = lambda p, s: reply([11, EOS], extra={99: Logprob(-0.01, rank=1)}, lp=lambda i: -2.0 - i)
    assert asyncio.run(backend.generate(req())).logprobs == (-2.0, -3.0)


@pytest.mark.parametrize("answer, message", [
    (reply([11, 12], "abort"), "finish_reason='abort'"),
    ([[11, 12], [{11: Logprob(-1.0)}], "stop", None], "1 log-prob entries for 2 tokens"),
    ([[11, 12], [{11: Logprob(-1.0)}, {13: Logprob(-1.0)}], "stop", None], "no log-prob for sampled token 12 at 1"),
])
def test_malformed_outputs_are_errors(fake, backend, answer, message):
    fake.respond = lambda p, s: answer
    with pytest.raises(RuntimeError, match=message):
        asyncio.run(backend.generate(req()))


# ---------------------------------------------------------------------------------------------------
# Concurrency, event loops, metrics


def test_concurrent_requests_each_get_their_own_answer(fake, backend):
    fake.respond = lambda p, s: reply([100 + p[0], EOS])
    fake.delay = lambda p: 0.01 * (8 - p[0])  # the first submitted finishes last

    async def main():
        return await asyncio.gather(*[backend.generate(req(prompt=(i, 3), seed=i)) for i in range(8)])

    outs = asyncio.run(main())
    assert [o.token_ids for o in outs] == [(100 + i, EOS) for i in range(8)]
    ids = [r[2] for r in fake.engine.requests]
    assert len(set(ids)) == 8 and fake.engine.finished_order != ids
    assert sorted(r[1].seed for r in fake.engine.requests) == list(range(8))


def test_engine_runs_on_its_own_loop_across_caller_loops(fake, backend):
    asyncio.run(backend.generate(req()))
    asyncio.run(backend.generate(req()))
    assert len(fake.engine.loops) == 1


def test_metrics_count_requests_and_tokens(fake, backend):
    snap = backend.metrics_snapshot()
    asyncio.run(backend.generate(req(prompt=(1, 2, 3, 4))))
    m = backend.metrics_since(snap)
    assert (m["gen/requests"], m["gen/tokens"], m["gen/prompt_tokens"]) == (1.0, 3.0, 4.0)
    assert m["time/generate_s"] > 0 and m["speed/tokens_per_s"] > 0


# ---------------------------------------------------------------------------------------------------
# Weights and shutdown


def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    embed = torch.randn(10, 4)
    return {"model.embed_tokens.weight": embed, "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
            "model.norm.weight": torch.randn(4), "lm_head.weight": embed}  # tied: shared storage


def test_update_weights_loads_every_tensor_in_every_worker_then_resets_the_prefix_cache(fake, smol_tokenizer):
    args = dict(ENGINE_ARGS, tensor_parallel_size=2)
    b = vb.VLLMBackend(fake.module, args, [EOS], 64, torch.bfloat16, smol_tokenizer)
    state = small_state()
    b.update_weights(state)
    b.close()
    events = fake.engine.events
    assert [e[1] for e in events[:-2]] == [vb.LOAD_METHOD] and events[-2:] == ["reset_prefix_cache", "shutdown"]
    path = events[0][2][0]
    assert not os.path.exists(path)  # temporary file removed
    for worker in fake.engine.workers:
        assert set(worker.loaded) == set(state)
        for name, tensor in state.items():
            assert worker.loaded[name].dtype == torch.bfloat16 and worker.loaded[name].shape == tensor.shape
            assert torch.equal(worker.loaded[name], tensor.to(torch.bfloat16))
    assert b.metrics_since(vb._Stats())["gen/weight_updates"] == 1.0


def test_update_weights_is_sent_in_bounded_chunks(fake, backend, monkeypatch):
    monkeypatch.setattr(vb, "WEIGHT_CHUNK_BYTES", 60)  # bf16: embed 80 B, up_proj 48 B, norm 8 B
    state = small_state()
    backend.update_weights(state)
    rpcs = [e for e in fake.engine.events if e != "reset_prefix_cache"]
    assert len(rpcs) == 3 and set(fake.engine.workers[0].loaded) == set(state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunks_are_copies_in_the_generation_dtype(dtype):
    state = small_state() | {"step": torch.tensor([3], dtype=torch.long)}
    chunks = list(vb.weight_chunks(state, dtype, 1 << 20))
    assert len(chunks) == 1
    c = chunks[0]
    assert c["lm_head.weight"].dtype == dtype and c["step"].dtype == torch.long
    assert c["lm_head.weight"].data_ptr() != c["model.embed_tokens.weight"].data_ptr()
    assert all(c[k].data_ptr() != v.data_ptr() for k, v in state.items())


def test_a_worker_that_loads_too_few_tensors_is_an_error(fake, backend, monkeypatch):
    monkeypatch.setattr(vb.TirlWorkerExtension, "tirl_load_weights", lambda self, path: 1)
    with pytest.raises(RuntimeError, match=r"loaded \[1\] tensors .* expected 4 each"):
        backend.update_weights(small_state())


def test_an_engine_without_the_weight_route_is_refused_naming_the_version(fake, monkeypatch, smol_tokenizer):
    fake.module.__version__ = "0.11.0"
    monkeypatch.delattr(FakeAsyncLLM, "collective_rpc")
    with pytest.raises(RuntimeError, match=r"vLLM 0.11.0: its engine has no \['collective_rpc'\]"):
        vb.VLLMBackend(fake.module, dict(ENGINE_ARGS), [EOS], 64, torch.bfloat16, smol_tokenizer)
    assert fake.engine.events == ["shutdown"]


def test_close_shuts_the_engine_down_once_and_ends_the_thread(fake, backend):
    backend.close()
    backend.close()
    assert fake.engine.events == ["shutdown"]
    assert not backend._loop.thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(backend.generate(req()))


# ---------------------------------------------------------------------------------------------------
# Import errors and from_policy


def test_missing_vllm_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ConfigError, match=r"backend.name=vllm needs vLLM \(pip install vllm, on a CUDA machine\)"):
        vb.import_vllm()


def test_too_old_vllm_is_refused_naming_its_version(fake):
    fake.module.__version__ = "0.10.1.1"
    with pytest.raises(ConfigError, match=r"vLLM >= 0.11.0 .* vLLM 0.10.1.1 is installed"):
        vb.import_vllm()
    fake.module.__version__ = "0.12.0+cu128"
    assert vb.import_vllm() is fake.module


def test_importing_the_backend_does_not_import_vllm():
    code = "import sys, tirl.backends.vllm; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.fixture
def tiny_policy(tiny_model_dir):
    from tirl.config import ModelConfig
    from tirl.trainer.build import load_policy

    return load_policy(ModelConfig(name=str(tiny_model_dir), dtype="bfloat16"), "cpu")


def vllm_config(*extra):
    from tirl.config import load_config

    return load_config(None, ["backend.name=vllm", "model.max_context=512", "run.seed=5",
                              "backend.vllm.gpu_memory_utilization=0.3", "backend.vllm.tensor_parallel_size=2",
                              "backend.vllm.max_num_seqs=7", "backend.vllm.enforce_eager=true", *extra])


def test_from_policy_builds_the_engine_and_loads_the_policy_weights(fake, tiny_policy):
    from tirl.models.loading import merged_state_dict
    from tirl.trainer.build import stop_ids

    cfg = vllm_config("backend.vllm.kwargs={enable_prefix_caching: true}")
    b = vb.VLLMBackend.from_policy(tiny_policy, cfg)
    b.close()
    assert fake.engine.engine_args.kwargs == dict(
        model=tiny_policy.path, tokenizer=tiny_policy.path, dtype="bfloat16", max_model_len=512, seed=5,
        tensor_parallel_size=2, gpu_memory_utilization=0.3, max_num_seqs=7, enforce_eager=True,
        logprobs_mode="processed_logprobs", worker_extension_cls="tirl.backends.vllm.TirlWorkerExtension",
        enable_prefix_caching=True)
    assert b.stop_token_ids == stop_ids(tiny_policy) and b.max_context == 512
    state = merged_state_dict(tiny_policy.model)
    for worker in fake.engine.workers:
        assert set(worker.loaded) == set(state)
        assert all(torch.equal(worker.loaded[k], v.to(torch.bfloat16)) for k, v in state.items())
    assert fake.engine.events[-2:] == ["reset_prefix_cache", "shutdown"]


def test_from_policy_refuses_kwargs_that_tirl_sets(fake, tiny_policy):
    with pytest.raises(ConfigError, match=r"backend.vllm.kwargs may not set \['logprobs_mode', 'seed'\]"):
        vb.VLLMBackend.from_policy(tiny_policy, vllm_config("backend.vllm.kwargs={seed: 1, logprobs_mode: x}"))
    assert fake.engines == []


def test_from_policy_refuses_top_p_sampling(fake, tiny_policy):
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9 with backend.name=vllm"):
        vb.VLLMBackend.from_policy(tiny_policy, vllm_config("rollout.top_p=0.9"))
