"""The `vllm` backend: an in-process vLLM engine (GPU), its weights refreshed from the trainer.

One `AsyncLLM` engine (vLLM's asynchronous V1 engine, `vllm.AsyncLLMEngine`) serves every trajectory:
each turn is one `engine.generate(TokensPrompt, SamplingParams, request_id)` request, and vLLM's
scheduler batches the requests in flight continuously. The engine lives on an event loop of its own
(a daemon thread), so rollouts may run under any event loop, one after another (`asyncio.Runner`s of
training and evaluation), without the engine's background tasks being tied to a loop that closed.

Semantics, matched to `tirl.backends.base`:

- Tokens in, tokens out: prompts are `TokensPrompt(prompt_token_ids=...)`; the completion is the
  sampled `token_ids`, which include the eos token or the token that completed a stop string (vLLM
  truncates only the text; any token after the one completing a stop string is cut here).
- Log-probabilities: vLLM's default (`logprobs_mode="raw_logprobs"`) reports the raw model
  distribution, before temperature. tirl's are of softmax(logits / temperature), untruncated by
  top-p; greedy requests are reported at temperature 1. The engine is therefore built with
  `logprobs_mode="processed_logprobs"` ("the values after applying all processors, including
  temperature and top_k/top_p"), which equals tirl's definition when top-p (and top-k) are off; a
  request with top_p < 1 and temperature > 0 is refused rather than given truncated log-probs.
  `SamplingParams.logprobs=0` returns exactly the sampled token's log-prob at each position.
- Finish reasons: vLLM's `finish_reason="length"` -> length; "stop" with a string `stop_reason`
  -> stop (a stop string); "stop" with `stop_reason` None (the model's eos) or a token id (one of
  `stop_token_ids`) -> eos. Anything else (an aborted request) is an error.
- Seeds: `SamplingParams.seed` is the request's own seed, so a sample does not depend on the batch.
- Weights: `update_weights` writes the trainer's (LoRA-merged) weights, cast to the generation dtype,
  to safetensors files in a temporary directory, chunk by chunk, and asks every vLLM worker to load
  them with `collective_rpc("tirl_load_weights", ...)`, a method `TirlWorkerExtension` adds to vLLM's
  worker (engine argument `worker_extension_cls`) that calls `model_runner.model.load_weights`, the
  route of vLLM's RLHF examples. The prefix cache is then reset (`reset_prefix_cache`), since cached
  KV blocks were computed by the old weights. This route is simple, not the fastest: weights travel
  through files (page cache) rather than CUDA IPC or NCCL, which vLLM also supports.

What was and was not run: this module is written against the documented API of vLLM 0.11 (the V1
engine; the same calls exist in later releases): `AsyncEngineArgs`, `AsyncLLMEngine.from_engine_args`,
`generate`, `collective_rpc`, `reset_prefix_cache`, `shutdown`, `SamplingParams`, `TokensPrompt`,
`RequestOutput`/`CompletionOutput`/`Logprob` (docs.vllm.ai: "Engine Arguments", "Sampling Parameters",
"Offline Inference" and the RLHF examples). It is unit-tested with a fake `vllm` module that records
the calls and answers with objects shaped like vLLM's (tests/backends/test_vllm.py). It has never been
run against a real vLLM installation.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.hf_engine import finish_reason
from tirl.errors import ConfigError

INSTALL_HINT = "backend.name=vllm needs vLLM (pip install vllm, on a CUDA machine)"
MIN_VLLM_VERSION = (0, 11, 0)
"""First release with only the V1 engine, whose `processed_logprobs` include temperature."""
WORKER_EXTENSION = "tirl.backends.vllm.TirlWorkerExtension"
LOAD_METHOD = "tirl_load_weights"
WEIGHT_CHUNK_BYTES = 1 << 30
"""Largest weight file written per `collective_rpc` (bounds the temporary disk and memory used)."""
OWNED_ENGINE_ARGS = ("model", "tokenizer", "dtype", "max_model_len", "seed", "tensor_parallel_size",
                     "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "logprobs_mode",
                     "worker_extension_cls")
"""Engine arguments tirl sets itself; `backend.vllm.kwargs` may not override them."""


def import_vllm():
    """The `vllm` module, or a clear error when it is missing or too old."""
    try:
        import vllm
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT}; importing it failed: {e}") from e
    version = getattr(vllm, "__version__", "unknown")
    if _version_tuple(version) < MIN_VLLM_VERSION:
        raise ConfigError(f"backend.name=vllm needs vLLM >= {'.'.join(map(str, MIN_VLLM_VERSION))} (its V1 engine "
                          f"with logprobs_mode=processed_logprobs); vLLM {version} is installed")
    return vllm


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


class TirlWorkerExtension:
    """Mixed into vLLM's worker class (engine argument `worker_extension_cls`); its methods run in every
    worker process through `collective_rpc`, with `self` the worker."""

    def tirl_load_weights(self, path: str) -> int:
        """Load the tensors of the safetensors file `path` (HF names) into this worker's model shard;
        returns how many tensors it read."""
        from safetensors.torch import load_file

        weights = load_file(path)
        self.model_runner.model.load_weights(weights=list(weights.items()))
        return len(weights)


@dataclass
class _Stats:
    """Cumulative counters (read as differences around a phase)."""

    requests: int = 0
    prompt_tokens: int = 0
    tokens: int = 0
    weight_updates: int = 0
    weight_sync_s: float = 0.0
    busy_s: float = 0.0
    """Wall time with at least one request in flight."""

    def as_metrics(self, since: _Stats) -> dict[str, float]:
        tokens, busy = self.tokens - since.tokens, self.busy_s - since.busy_s
        return {"gen/tokens": float(tokens), "gen/requests": float(self.requests - since.requests),
                "gen/prompt_tokens": float(self.prompt_tokens - since.prompt_tokens),
                "gen/weight_updates": float(self.weight_updates - since.weight_updates),
                "time/generate_s": busy, "time/weight_sync_s": self.weight_sync_s - since.weight_sync_s,
                "speed/tokens_per_s": tokens / busy if busy else 0.0}


class _LoopThread:
    """An event loop running forever in a daemon thread; the engine's coroutines all run on it."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tirl-vllm", daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro):
        """Run `coro` on the loop and wait for its result (from any other thread)."""
        return self.submit(coro).result()

    def stop(self) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()


class VLLMBackend:
    """Generator over an in-process vLLM `AsyncLLM` engine (see module docstring)."""

    def __init__(self, vllm, engine_args: dict[str, Any], stop_token_ids: Sequence[int], max_context: int,
                 weight_dtype: torch.dtype, tokenizer: Any):
        """`vllm`: the imported module; `engine_args`: `AsyncEngineArgs` keywords; `stop_token_ids`: tokens
        that end a turn (eos); `weight_dtype`: what `update_weights` casts to; `tokenizer`: the policy's,
        to place stop strings on token boundaries."""
        from vllm.sampling_params import RequestOutputKind

        self.vllm = vllm
        self.final_only = RequestOutputKind.FINAL_ONLY
        self.stop_token_ids = [int(t) for t in stop_token_ids]
        self.max_context = max_context
        self.weight_dtype = weight_dtype
        self.tokenizer = tokenizer
        self.stats = _Stats()
        self._ids = itertools.count()
        self._in_flight = 0
        self._busy_since = 0.0
        self._loop = _LoopThread()
        try:
            self.engine = self._loop.call(self._start_engine(engine_args))
            self._check_weight_route()
        except BaseException:
            self._loop.stop()
            raise

    @classmethod
    def from_policy(cls, policy, cfg) -> VLLMBackend:
        """The engine for `policy` (a `tirl.trainer.build.Policy`) under `cfg` (a `tirl.config.Config`),
        loaded with the policy's current weights."""
        from tirl.trainer.build import max_context, stop_ids, with_policy_weights  # here: trainer imports backends

        vllm = import_vllm()
        if cfg.rollout.temperature > 0 and cfg.rollout.top_p < 1.0:
            raise ConfigError(f"rollout.top_p={cfg.rollout.top_p} with backend.name=vllm: vLLM reports log-probs of "
                              "the top-p truncated distribution, not the untruncated one tirl trains with; set "
                              "rollout.top_p=1.0 or use backend.name=hf")
        vcfg = cfg.backend.vllm
        clash = sorted(set(vcfg.kwargs) & set(OWNED_ENGINE_ARGS))
        if clash:
            raise ConfigError(f"backend.vllm.kwargs may not set {clash}: tirl sets them (from model.*, run.seed and "
                              "backend.vllm.* fields)")
        limit = max_context(cfg.model, policy.model)
        engine_args = dict(model=policy.path, tokenizer=policy.path, dtype=_dtype_name(policy.compute_dtype),
                           max_model_len=limit, seed=cfg.run.seed, tensor_parallel_size=vcfg.tensor_parallel_size,
                           gpu_memory_utilization=vcfg.gpu_memory_utilization, max_num_seqs=vcfg.max_num_seqs,
                           enforce_eager=vcfg.enforce_eager, logprobs_mode="processed_logprobs",
                           worker_extension_cls=WORKER_EXTENSION, **vcfg.kwargs)
        return with_policy_weights(cls(vllm, engine_args, stop_ids(policy), limit, policy.compute_dtype,
                                       policy.tokenizer), policy)

    async def _start_engine(self, engine_args: dict[str, Any]):
        return self.vllm.AsyncLLMEngine.from_engine_args(self.vllm.AsyncEngineArgs(**engine_args))

    def _check_weight_route(self) -> None:
        missing = [m for m in ("collective_rpc", "reset_prefix_cache") if not callable(getattr(self.engine, m, None))]
        if missing:
            version = getattr(self.vllm, "__version__", "unknown")
            self.engine.shutdown()
            raise RuntimeError(f"vLLM {version}: its engine has no {missing}, which the weight update after every "
                               f"optimizer step needs (vLLM >= {'.'.join(map(str, MIN_VLLM_VERSION))} has them)")

    # ------------------------------------------------------------------------------------------------
    # Generation

    def sampling_params(self, request: GenerationRequest, max_tokens: int):
        """vLLM `SamplingParams` for one turn (see module docstring for the log-prob semantics)."""
        s = request.sampling
        if s.temperature > 0 and s.top_p < 1.0:
            raise ValueError(f"top_p={s.top_p} with the vllm backend: vLLM would report log-probs of the top-p "
                             "truncated distribution, not the untruncated one tirl trains with; use "
                             "rollout.top_p=1.0 or backend.name=hf")
        stop = list(request.stop_strings)
        return self.vllm.SamplingParams(
            n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=max_tokens, seed=request.seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids), include_stop_str_in_output=True,
            logprobs=0, detokenize=bool(stop), skip_special_tokens=False, output_kind=self.final_only)

    async def generate(self, request: GenerationRequest) -> Completion:
        """Generate one continuation (many may be awaited concurrently; vLLM batches them)."""
        if request.want_entropies:
            raise NotImplementedError("the vllm backend does not report per-position entropies (vLLM returns "
                                      "log-probs of chosen tokens only); entropy-guided branching needs "
                                      "backend.name=hf")
        if self.engine is None:
            raise RuntimeError("the vllm backend was closed; no engine to generate with")
        budget = min(request.max_new_tokens, self.max_context - len(request.prompt_ids))
        if budget <= 0:
            return Completion((), (), "length")
        params = self.sampling_params(request, budget)
        request_id = f"tirl-{next(self._ids)}"
        self._enter()
        try:
            output = await asyncio.wrap_future(self._loop.submit(self._run(request.prompt_ids, params, request_id)))
        finally:
            self._leave()
        completion = completion_from_output(output, request.stop_strings, self.tokenizer)
        self.stats.requests += 1
        self.stats.prompt_tokens += len(request.prompt_ids)
        self.stats.tokens += len(completion.token_ids)
        return completion

    async def _run(self, prompt_ids: Sequence[int], params, request_id: str):
        """On the engine loop: submit one request and return its final `RequestOutput`."""
        prompt = self.vllm.TokensPrompt(prompt_token_ids=list(prompt_ids))
        final = None
        async for output in self.engine.generate(prompt, params, request_id):
            final = output
        if final is None or not final.finished:
            raise RuntimeError(f"vLLM request {request_id} ended without a finished output")
        return final

    def _enter(self) -> None:
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self.stats.busy_s += time.perf_counter() - self._busy_since

    @asynccontextmanager
    async def participant(self):
        """vLLM schedules continuously; nothing waits for trajectories, so this holds nothing."""
        yield

    # ------------------------------------------------------------------------------------------------
    # Weights, metrics, shutdown

    @torch.no_grad()
    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Load new weights (HF names, LoRA merged) into every worker, then reset the prefix cache."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="tirl-vllm-weights-") as tmp:
            for i, chunk in enumerate(weight_chunks(state_dict, self.weight_dtype, WEIGHT_CHUNK_BYTES)):
                self._send_chunk(chunk, os.path.join(tmp, f"chunk-{i:05d}.safetensors"))
        self._loop.call(self.engine.reset_prefix_cache())
        self.stats.weight_updates += 1
        self.stats.weight_sync_s += time.perf_counter() - t0

    def _send_chunk(self, chunk: dict[str, torch.Tensor], path: str) -> None:
        from safetensors.torch import save_file

        save_file(chunk, path)
        try:
            loaded = self._loop.call(self.engine.collective_rpc(LOAD_METHOD, args=(path,)))
        finally:
            os.remove(path)
        if not loaded or any(n != len(chunk) for n in loaded):
            raise RuntimeError(f"vLLM workers loaded {loaded} tensors of {path}, expected {len(chunk)} each")

    def metrics_snapshot(self) -> _Stats:
        return replace(self.stats)

    def metrics_since(self, snapshot: _Stats) -> dict[str, float]:
        return self.stats.as_metrics(snapshot)

    def close(self) -> None:
        """Shut the engine down and end its thread (idempotent)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None and not self._loop.loop.is_closed():
            self._loop.call(_shutdown(engine))
        self._loop.stop()


async def _shutdown(engine) -> None:
    engine.shutdown()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def weight_chunks(state_dict: dict[str, Any], dtype: torch.dtype, max_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """The state dict as CPU copies (floating tensors cast to `dtype`), in chunks of at most `max_bytes`
    (a larger tensor gets a chunk of its own). Copies, so tied tensors never share storage in a file."""
    chunk: dict[str, torch.Tensor] = {}
    size = 0
    for name, value in state_dict.items():
        tensor = value.detach()
        target = dtype if tensor.is_floating_point() else tensor.dtype
        nbytes = tensor.numel() * torch.empty(0, dtype=target).element_size()
        if chunk and size + nbytes > max_bytes:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = tensor.to(device="cpu", dtype=target, copy=True).contiguous()
        size += nbytes
    if chunk:
        yield chunk


def completion_from_output(output, stop_strings: Sequence[str], tokenizer: Any) -> Completion:
    """Map a finished vLLM `RequestOutput` (n=1, logprobs=0) to a `Completion`."""
    if len(output.outputs) != 1:
        raise RuntimeError(f"vLLM request {output.request_id} returned {len(output.outputs)} outputs, expected 1")
    out = output.outputs[0]
    ids = [int(t) for t in out.token_ids]
    if out.logprobs is None or len(out.logprobs) != len(ids):
        raise RuntimeError(f"vLLM request {output.request_id}: {0 if out.logprobs is None else len(out.logprobs)} "
                           f"log-prob entries for {len(ids)} tokens (SamplingParams.logprobs=0 must give one each)")
    logprobs = []
    for pos, (tok, entry) in enumerate(zip(ids, out.logprobs)):
        if tok not in entry:
            raise RuntimeError(f"vLLM request {output.request_id}: no log-prob for sampled token {tok} at {pos}")
        logprobs.append(float(entry[tok].logprob))
    reason = _finish(output.request_id, out.finish_reason, out.stop_reason)
    if reason == "stop":
        keep = stop_cut(ids, stop_strings, tokenizer)
        ids, logprobs = ids[:keep], logprobs[:keep]
    return Completion(tuple(ids), tuple(logprobs), reason)


def _finish(request_id: str, finish: str | None, stop_reason: Any) -> str:
    if finish == "length":
        return "length"
    if finish == "stop":
        return "stop" if isinstance(stop_reason, str) else "eos"
    raise RuntimeError(f"vLLM request {request_id} ended with finish_reason={finish!r} (stop_reason={stop_reason!r})")


def stop_cut(ids: Sequence[int], stop_strings: Sequence[str], tokenizer: Any) -> int:
    """Number of tokens up to and including the first one that completes a stop string (all of them
    when none is found by token-tail decoding, as tirl's other backends check it)."""
    for k in range(1, len(ids) + 1):
        if finish_reason(list(ids[:k]), len(ids) + 1, (), stop_strings, tokenizer) == "stop":
            return k
    return len(ids)
