"""One behaviour suite that every backend passes, all with the default model (SmolLM2-135M-Instruct):

- `hf`: tirl's in-process transformers backend;
- `openai-chat`: the openai backend against `transformers serve` (a real third-party server; `auto`
  must pick chat there: its /v1/completions takes no token ids). Text-level: ids are the policy
  tokenizer's encoding of the answer, and the server reports no log-probs (it ignores `logprobs`);
- `openai-completions`: the openai backend's token-exact completions path, against the loopback
  server of conftest.py (tirl's own hf backend behind vLLM's HTTP dialect, not a third-party server);
- `vllm`: the in-process vLLM engine (only where vLLM is installed and a GPU is present).

Checked: stops at a tool-call end (the completing token kept, finish_reason stop), stop strings in
general, log-probs (one per token, finite, <= 0), budgets, eos, greedy determinism, seeds, concurrency.
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from dataclasses import dataclass
from typing import Any

import pytest

from tirl.backends.base import GenerationRequest, SamplingParams
from tirl.types import Message

SYSTEM = Message("system", "You are a helpful assistant.")
GREEDY = SamplingParams(0.0)
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "%s"}}\n</tool_call>'


@dataclass(frozen=True)
class Subject:
    """A backend under test and what its server can report."""

    name: str
    backend: Any
    logprobs: str | None
    """None when per-token log-probs are reported; else why not."""


def _vllm_ready() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed"
    import torch

    return None if torch.cuda.is_available() else "vllm needs a CUDA GPU"


def _build(name: str, request, tokenizer, model):
    stop = [tokenizer.eos_token_id]
    if name == "hf":
        from tirl.backends.hf import HFBackend

        return HFBackend(model, tokenizer, stop, max_context=2048)
    if name.startswith("openai"):
        from tirl.backends.openai import OpenAIBackend

        server = request.getfixturevalue("transformers_server" if name == "openai-chat" else "completions_server")
        backend = OpenAIBackend(server.base_url, tokenizer, stop, tokenizer.eos_token_id, endpoint="auto",
                                max_concurrency=8, request_timeout_s=300)
        return backend
    from tirl.backends.vllm import VLLMBackend
    from tirl.config import Config
    from tirl.trainer.build import load_policy

    cfg = Config.model_validate({"backend": {"name": "vllm"}})
    return VLLMBackend.from_policy(load_policy(cfg.model, "cuda", trainable=False), cfg)


@pytest.fixture(scope="module", params=["hf", "openai-chat", "openai-completions",
                                        pytest.param("vllm", marks=pytest.mark.gpu)])
def subject(request, smol_tokenizer, smol_model):
    name = request.param
    if name == "vllm" and _vllm_ready():
        pytest.skip(_vllm_ready())
    backend = _build(name, request, smol_tokenizer, smol_model)
    no_logprobs = ("transformers serve ignores `logprobs` (it lists the field among those it does not support)"
                   if name == "openai-chat" else None)
    yield Subject(name, backend, no_logprobs)
    backend.close()


def _request(fmt, messages, max_new_tokens=24, stop=(), sampling=GREEDY, seed=0) -> GenerationRequest:
    msgs = (SYSTEM, *messages)
    return GenerationRequest(prompt_ids=tuple(fmt.prompt_ids(list(msgs), None)), max_new_tokens=max_new_tokens,
                             stop_strings=tuple(stop), sampling=sampling, seed=seed, messages=msgs)


def _run(backend, *requests):
    async def main():
        return await asyncio.gather(*(backend.generate(r) for r in requests))

    return asyncio.run(main())


def _say(text: str) -> tuple[Message, ...]:
    return (Message("user", text),)


def _check_shape(c, request) -> None:
    assert len(c.token_ids) == len(c.logprobs) >= 1
    assert len(c.token_ids) <= request.max_new_tokens
    assert c.finish_reason in ("eos", "stop", "length")


def test_stops_at_the_end_of_a_tool_call(subject, smol_format):
    """Few-shot tool calls: generation stops at `</tool_call>`, keeping the token that completes it."""
    shots = []
    for q in ("2+2", "3*7", "10-4"):
        shots += [Message("user", f"What is {q}?"), Message("assistant", CALL % q)]
    msgs = (Message("system", "Answer every question with a tool call in exactly this form: " + CALL % "1+1"),
            *shots, Message("user", "What is 5*6?"))
    request = GenerationRequest(prompt_ids=tuple(smol_format.prompt_ids(list(msgs), None)), max_new_tokens=48,
                                stop_strings=(smol_format.tool_call_stop,), sampling=GREEDY, messages=msgs)
    [c] = _run(subject.backend, request)
    _check_shape(c, request)
    text = smol_format.decode(c.token_ids)
    assert c.finish_reason == "stop", text
    assert "</tool_call>" in text and "</tool_call>" not in smol_format.decode(c.token_ids[:-1])
    assert "<tool_call>" in text


def test_any_stop_string_is_kept_and_ends_the_turn(subject, smol_format):
    """A word from the middle of the greedy answer, used as a stop string, cuts the answer right after it."""
    free = _request(smol_format, _say("Describe the sea in two sentences."), max_new_tokens=24)
    [full] = _run(subject.backend, free)
    full_text = smol_format.decode(full.token_ids)
    words = [w for w in full_text.split()[3:] if w.isalpha() and len(w) >= 4]
    assert words, f"the greedy answer has no usable word: {full_text!r}"
    stop = words[0]
    request = _request(smol_format, _say("Describe the sea in two sentences."), max_new_tokens=24, stop=(stop,))
    [c] = _run(subject.backend, request)
    _check_shape(c, request)
    text = smol_format.decode(c.token_ids)
    assert c.finish_reason == "stop"
    assert stop in text and stop not in smol_format.decode(c.token_ids[:-1])
    assert full_text.startswith(text)


def test_logprobs_one_per_token_finite_and_not_positive(subject, smol_format):
    if subject.logprobs is not None:
        pytest.skip(subject.logprobs)
    request = _request(smol_format, _say("Tell me about cats."), max_new_tokens=16,
                       sampling=SamplingParams(1.0), seed=3)
    [c] = _run(subject.backend, request)
    _check_shape(c, request)
    assert all(math.isfinite(lp) and lp <= 0.0 for lp in c.logprobs), c.logprobs


def test_budget_is_never_exceeded(subject, smol_format):
    for budget in (1, 6):
        request = _request(smol_format, _say("Write a long story about a dragon."), max_new_tokens=budget,
                           sampling=SamplingParams(1.0), seed=budget)
        [c] = _run(subject.backend, request)
        _check_shape(c, request)
        assert c.finish_reason == "length" and len(c.token_ids) == budget


def test_end_of_turn_token_maps_to_eos(subject, smol_format, smol_tokenizer):
    request = _request(smol_format, _say("Say hi"), max_new_tokens=64)
    [c] = _run(subject.backend, request)
    _check_shape(c, request)
    assert c.finish_reason == "eos", smol_format.decode(c.token_ids)
    assert c.token_ids[-1] == smol_tokenizer.eos_token_id
    assert smol_tokenizer.eos_token_id not in c.token_ids[:-1]


def test_temperature_zero_is_deterministic(subject, smol_format):
    request = _request(smol_format, _say("Name three fruits."), max_new_tokens=16)
    [a] = _run(subject.backend, request)
    [b] = _run(subject.backend, request)
    assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    if subject.logprobs is None:
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_seed_fixes_the_sample_and_seeds_differ(subject, smol_format):
    def sample(seed):
        request = _request(smol_format, _say("Invent a name for a cat."), max_new_tokens=12,
                           sampling=SamplingParams(1.0), seed=seed)
        return _run(subject.backend, request)[0].token_ids

    first = sample(11)
    assert sample(11) == first
    assert len({first, sample(12), sample(13)}) > 1


def test_concurrent_requests_match_one_at_a_time(subject, smol_format):
    prompts = ["Name a prime.", "What is 2+2?", "Say hello in French."]
    requests = [_request(smol_format, _say(p), max_new_tokens=8) for p in prompts]
    alone = [_run(subject.backend, r)[0] for r in requests]
    snapshot = subject.backend.metrics_snapshot()
    together = _run(subject.backend, *requests)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in together] == [c.finish_reason for c in alone]
    assert subject.backend.metrics_since(snapshot)["gen/tokens"] == sum(len(c.token_ids) for c in together)
