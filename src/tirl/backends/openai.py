"""The `openai` backend: generation on any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp,
`transformers serve`, hosted APIs), one HTTP request per trajectory turn.

Two endpoints, chosen by `endpoint`:

- `completions` (token-exact): the prompt goes out as a list of token ids (`prompt=[...]`), and the
  sampled ids come back, from (in order of preference) the choice's `token_ids` (vLLM,
  `return_token_ids`), logprob tokens written `token_id:N` (vLLM, `return_tokens_as_token_ids`), or
  the per-token text pieces of `logprobs.tokens` where each piece is the decoding of exactly one
  vocabulary entry (a proof that the id is known; otherwise the request fails). vLLM-specific fields
  travel in `extra_body`; `include_stop_str_in_output` keeps a stop string in the text.
- `chat` (text-level, evaluation only): `request.messages` and `request.tools` go out as a chat
  completion; the server renders the prompt with its own chat template (which may differ from the
  policy's) and answers with text. Token ids are then the policy tokenizer's encoding of that text
  (exact ids only when the server's per-token logprob pieces map to unique vocabulary entries).
  Servers that ignore `logprobs` (`transformers serve` does) leave the log-probs unknown: NaN.
  Training on such turns would break DESIGN.md invariant 1, so `preflight` refuses RL with this
  backend.
- `auto` probes the server once with a one-token token-id completion and uses `completions` when it
  answers with token ids, else `chat`; the choice is logged.

Semantics, matched to `tirl.backends.base` and the hf backend: the completion is cut after the first
token at which the hf rule stops (an eos/stop token id, a stop string completed by the decoded tail,
or the budget), so the token that completes a stop string is kept and nothing after it. When a chat
server answers "stop" without the stop text (vLLM reports it as a string `stop_reason`), the stop
string is re-appended; with no `stop_reason` and no stop text the turn is taken to have ended with
the eos token, which is appended (as the hf backend samples it). Tool calls a chat server parsed out
of the text are written back in the Hermes markup tirl parses.

A fleet: `base_url` may list several servers of the same model. Each request goes to one of them,
every turn of a trajectory to the same one (`tirl.backends.fleet.Router`); the served model name is
asked of every server and must agree. `max_concurrency` bounds the requests in flight in total.

Weights: with `weight_sync=none` (the default) the servers keep their model: `update_weights` raises,
and `preflight` refuses RL. With `weight_sync=vllm_files`, `update_weights` writes the weights as
safetensors files under `weight_dir` and every server loads them through vLLM's dev-mode
`/collective_rpc` and `/reset_prefix_cache` endpoints (`tirl.backends.fleet.FleetWeights`); the servers
must be `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL --worker-extension-cls
tirl.backends.vllm.TirlWorkerExtension`, and `endpoint=auto` means completions (token-exact, as training
needs). The update returns when every server has loaded every file. What was run: this route over HTTP
against the test suite's loopback server speaking vLLM's dev-mode API (tests/backends/conftest.py, tirl's
hf backend behind it), for one server and a fleet of two, through `tirl train`; never against a real
vLLM, which does not run on a CPU.

Retries (connection errors, 408/409/429/5xx, with exponential backoff) and timeouts of generation
requests are the `openai` client's own (`max_retries`, `timeout`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from tirl.backends.base import Completion, GenerationRequest
from tirl.backends.fleet import FleetWeights, Router
from tirl.backends.hf_engine import finish_reason
from tirl.errors import ConfigError, TirlError

log = logging.getLogger("tirl.backends.openai")

INSTALL_HINT = "backend.name=openai needs the openai package: pip install 'tirl[openai]'"
VLLM_EXTRAS = {"return_token_ids": True, "return_tokens_as_token_ids": True, "include_stop_str_in_output": True,
               "skip_special_tokens": False}
"""vLLM's extra completion fields: token ids in the answer, ids in logprob tokens, stop text kept."""
TOKEN_ID_PREFIX = "token_id:"


class ServerError(TirlError):
    """The server could not be reached or gave an answer tirl cannot use (the message names URL and model)."""

    def __init__(self, message: str, answered: bool = True):
        super().__init__(message)
        self.answered = answered
        """False when no answer came (connection refused, timeout): not a property of the endpoint."""


def import_openai():
    """The `openai` module, or a `ConfigError` naming the extra that installs it."""
    try:
        import openai
    except ImportError as e:
        raise ConfigError(f"{INSTALL_HINT} (importing it failed: {e})") from e
    return openai


@dataclass
class _Stats:
    """Cumulative counters (read as differences around a phase)."""

    requests: int = 0
    tokens: int = 0
    """Completion tokens returned to the rollout."""
    prompt_tokens: int = 0
    request_s: float = 0.0
    """Sum of request latencies (concurrent requests overlap)."""
    unknown_logprobs: int = 0
    """Tokens whose log-prob the server did not report (NaN)."""
    weight_updates: int | None = None
    """Weight pushes to the fleet (None: weight sync off, no weight metrics)."""
    weight_sync_s: float = 0.0

    def as_metrics(self, since: _Stats) -> dict[str, float]:
        requests, seconds = self.requests - since.requests, self.request_s - since.request_s
        out = {"gen/requests": float(requests), "gen/tokens": float(self.tokens - since.tokens),
               "gen/prompt_tokens": float(self.prompt_tokens - since.prompt_tokens),
               "gen/unknown_logprobs": float(self.unknown_logprobs - since.unknown_logprobs),
               "time/request_s": seconds, "speed/request_ms": 1000 * seconds / requests if requests else 0.0}
        if self.weight_updates is not None:
            out["gen/weight_updates"] = float(self.weight_updates - (since.weight_updates or 0))
            out["time/weight_sync_s"] = self.weight_sync_s - since.weight_sync_s
        return out


@dataclass
class _LoopState:
    """Clients (one per server), semaphore and probe lock of one event loop (httpx connections belong to
    a loop)."""

    loop: asyncio.AbstractEventLoop
    clients: list[Any]
    semaphore: asyncio.Semaphore
    lock: asyncio.Lock


class OpenAIBackend:
    """Generator over an OpenAI-compatible HTTP server (see module docstring)."""

    def __init__(self, base_url: str | Sequence[str], tokenizer, stop_token_ids: Sequence[int], eos_token_id: int,
                 model: str | None = None, endpoint: str = "auto", api_key: str | None = None,
                 max_concurrency: int = 64, request_timeout_s: float = 600.0, max_retries: int = 3,
                 weights: FleetWeights | None = None):
        """`base_url`: one server's /v1 URL or a fleet's; `model`: the served name (None: the servers' only
        model, from GET /models); `stop_token_ids`: tokens that end a turn (eos); `eos_token_id`: the
        end-of-turn token appended when a chat server reports an end of turn (its text omits it);
        `weights`: how `update_weights` reaches the servers (None: it raises)."""
        if endpoint not in ("auto", "completions", "chat"):
            raise ConfigError(f"backend.openai.endpoint must be auto, completions or chat, got {endpoint!r}")
        self._openai = import_openai()
        self.base_urls = [u.rstrip("/") for u in ([base_url] if isinstance(base_url, str) else base_url)]
        if not self.base_urls:
            raise ConfigError("backend.openai.base_url: no server given")
        self.base_url = self.base_urls[0] if len(self.base_urls) == 1 else ", ".join(self.base_urls)
        """The server's URL (a fleet's: all of them), as error messages name it."""
        self.router = Router(len(self.base_urls))
        self.weights = weights
        self.shared_by_ranks = weights is not None
        """Data-parallel ranks generate on the same servers, so one rank's push serves all
        (`tirl.trainer.distributed.push_weights`)."""
        self.model = model
        self.endpoint: str | None = None if endpoint == "auto" else endpoint
        """The endpoint in use: completions or chat (None until `auto` has probed)."""
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(int(t) for t in stop_token_ids)
        self.eos_token_id = int(eos_token_id)
        self._api_key = api_key or "EMPTY"  # local servers accept any key; the client insists on one
        self._max_concurrency, self._timeout, self._max_retries = max_concurrency, request_timeout_s, max_retries
        self._state: _LoopState | None = None
        self._pieces: dict[str, int] | None = None
        self._warned_logprobs = False
        self.stats = _Stats(weight_updates=0 if weights is not None else None)

    @classmethod
    def from_config(cls, cfg, tokenizer, stop_token_ids: Sequence[int], eos_token_id: int,
                    compute_dtype=None) -> OpenAIBackend:
        """From a `tirl.config.OpenAIBackendConfig`; the API key is read from `cfg.api_key_env`.
        `compute_dtype`: the policy's, the pushed weights' dtype under `weight_dtype=auto`."""
        import os

        import torch

        weights, endpoint = None, cfg.endpoint
        if cfg.weight_sync == "vllm_files":
            dtype = compute_dtype if cfg.weight_dtype == "auto" else getattr(torch, cfg.weight_dtype)
            if dtype is None:
                raise ConfigError("backend.openai.weight_dtype=auto needs the policy's compute dtype")
            weights = FleetWeights(_urls(cfg.base_url), cfg.weight_dir, dtype, cfg.request_timeout_s)
            endpoint = "completions" if endpoint == "auto" else endpoint  # training needs token ids
        return cls(cfg.base_url, tokenizer, stop_token_ids, eos_token_id, model=cfg.model, endpoint=endpoint,
                   api_key=os.environ.get(cfg.api_key_env), max_concurrency=cfg.max_concurrency,
                   request_timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries, weights=weights)

    # ----------------------------------------------------------------- Generator protocol
    async def generate(self, request: GenerationRequest) -> Completion:
        """One request per call; at most `max_concurrency` in flight."""
        if request.max_new_tokens <= 0:
            return Completion((), (), "length")
        state = self._loop_state()
        server = self.router.pick(request)
        try:
            async with state.semaphore:
                await self._resolve(state)
                t0 = time.perf_counter()
                client, url = state.clients[server], self.base_urls[server]
                if self.endpoint == "completions":
                    completion = await self._complete(client, request, url)
                else:
                    completion = await self._chat(client, request, url)
                self.stats.request_s += time.perf_counter() - t0
        finally:
            self.router.done(server)
        self.stats.requests += 1
        self.stats.tokens += len(completion.token_ids)
        self.stats.prompt_tokens += len(request.prompt_ids)
        self.stats.unknown_logprobs += sum(1 for lp in completion.logprobs if math.isnan(lp))
        return completion

    def update_weights(self, state_dict: dict[str, Any]) -> None:
        """Every server loads `state_dict` (HF names, LoRA merged) and resets its prefix cache, when weight
        sync is on (see module docstring); raises otherwise."""
        if self.weights is None:
            raise ConfigError(f"backend.name=openai generates with the model served at {self.base_url} "
                              f"({self.model or 'its default model'}), which cannot receive the trainer's weights "
                              "unless backend.openai.weight_sync=vllm_files; without it use it for `tirl eval` "
                              "(pipeline.rl=false), and backend.name=hf or vllm for training")
        t0 = time.perf_counter()
        files = self.weights.push(state_dict)
        seconds = time.perf_counter() - t0
        self.stats.weight_updates += 1
        self.stats.weight_sync_s += seconds
        log.info("openai backend: %d servers loaded new weights (%d files) in %.1f s", len(self.base_urls), files,
                 seconds)

    def participant(self):
        """No batching to wait for: every request goes out at once."""
        return nullcontext()

    def metrics_snapshot(self) -> _Stats:
        return replace(self.stats)

    def metrics_since(self, snapshot: _Stats) -> dict[str, float]:
        return self.stats.as_metrics(snapshot)

    def close(self) -> None:
        """Drop the client (its connections close with it; a client of a finished loop cannot be awaited)."""
        state, self._state = self._state, None
        if state is not None and not state.loop.is_closed() and not state.loop.is_running():
            for client in state.clients:
                state.loop.run_until_complete(client.close())

    # ----------------------------------------------------------------- set-up
    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._state is None or self._state.loop is not loop:
            clients = [self._openai.AsyncOpenAI(base_url=url, api_key=self._api_key, timeout=self._timeout,
                                                max_retries=self._max_retries) for url in self.base_urls]
            self._state = _LoopState(loop, clients, asyncio.Semaphore(self._max_concurrency), asyncio.Lock())
        return self._state

    async def _resolve(self, state: _LoopState) -> None:
        """Find the served model name and, for `auto`, the endpoint (once, under a lock)."""
        if self.model is not None and self.endpoint is not None:
            return
        async with state.lock:
            if self.model is None:
                names = [await self._served_model(c, u) for c, u in zip(state.clients, self.base_urls)]
                if len(set(names)) != 1:
                    raise ServerError(f"the servers of backend.openai.base_url serve different models: "
                                      f"{dict(zip(self.base_urls, names))}; a fleet serves one model")
                self.model = names[0]
            if self.endpoint is None:
                self.endpoint = await self._probe(state.clients[0], self.base_urls[0])

    async def _served_model(self, client, url: str) -> str:
        try:
            page = await client.models.list()
        except self._openai.OpenAIError as e:
            raise self._error("listing the served models (GET /models)", e, url) from e
        names = [m.id for m in page.data]
        if len(names) != 1:
            raise ServerError(f"{url} serves {len(names)} models ({', '.join(names) or 'none'}); "
                              "name one with backend.openai.model")
        log.info("openai backend: %s serves %r", url, names[0])
        return names[0]

    async def _probe(self, client, url: str) -> str:
        """completions when a one-token completion over token ids answers with token ids, else chat."""
        probe = GenerationRequest(prompt_ids=tuple(self.tokenizer.encode("Hello", add_special_tokens=False)),
                                  max_new_tokens=1)
        try:
            await self._complete(client, probe, url)
        except ServerError as e:
            if not e.answered:
                raise
            log.warning("openai backend: %s (%s) has no token-exact completions endpoint (%s); using chat "
                        "completions: text-level, for evaluation only", url, self.model, e)
            return "chat"
        log.warning("openai backend: %s (%s): using token-exact /completions", self.base_url, self.model)
        return "completions"

    def _error(self, what: str, e: Exception, url: str) -> ServerError:
        answered = isinstance(e, self._openai.APIStatusError)
        if answered:
            answer = f": the server answered HTTP {e.status_code}: {_body(e)}"
        elif isinstance(e, self._openai.APITimeoutError):
            answer = f": no answer within {self._timeout:g} s (backend.openai.request_timeout_s)"
        elif isinstance(e, self._openai.APIConnectionError):
            answer = f": cannot connect ({e.__cause__ or e}); is the server running?"
        else:
            answer = f": {e}"
        return ServerError(f"openai backend, {what} at {url} (model {self.model!r}){answer}", answered)

    # ----------------------------------------------------------------- completions (token-exact)
    async def _complete(self, client, request: GenerationRequest, url: str) -> Completion:
        try:
            resp = await client.completions.create(
                prompt=list(request.prompt_ids), logprobs=1, extra_body=VLLM_EXTRAS, **self._common(request))
        except self._openai.OpenAIError as e:
            raise self._error("POST /completions", e, url) from e
        choice = _only_choice(resp, url, self.model)
        data = choice.to_dict() if hasattr(choice, "to_dict") else dict(choice)
        ids, logprobs = self._completion_tokens(data, url)
        return self._settle(ids, logprobs, request, data.get("finish_reason"), data.get("stop_reason"), url)

    def _completion_tokens(self, data: dict, url: str) -> tuple[list[int], list[float]]:
        """Sampled ids and their log-probs from a completion choice (see module docstring for the sources)."""
        lp = data.get("logprobs") or {}
        pieces, values = lp.get("tokens"), lp.get("token_logprobs")
        ids = data.get("token_ids")
        if ids is None and pieces is not None:
            ids = _ids_from_token_strings(pieces) or self._ids_from_pieces(pieces)
        if ids is None:
            raise ServerError(f"{url} (model {self.model!r}) answered /completions without token ids "
                              f"(no `token_ids`, and its logprob tokens {(pieces or [])[:5]!r} do not identify "
                              "vocabulary entries); training needs them: serve with vLLM or use endpoint=chat for "
                              "evaluation")
        ids = [int(t) for t in ids]
        if values is None or len(values) != len(ids):
            raise ServerError(f"{url} (model {self.model!r}) answered /completions with "
                              f"{len(ids)} tokens but {len(values or [])} log-probs (requested logprobs=1)")
        return ids, [float(v) if v is not None else math.nan for v in values]

    def _ids_from_pieces(self, pieces: Sequence[str]) -> list[int] | None:
        """Ids of per-token text pieces, or None unless every piece decodes from exactly one vocabulary entry."""
        if self._pieces is None:
            seen: dict[str, int] = {}
            ambiguous: set[str] = set()
            for i in range(len(self.tokenizer)):
                text = self.tokenizer.decode([i], skip_special_tokens=False)
                (ambiguous.add(text) if text in seen else seen.__setitem__(text, i))
            self._pieces = {t: i for t, i in seen.items() if t not in ambiguous and "\ufffd" not in t}
        ids = [self._pieces.get(p) for p in pieces]
        if any(i is None for i in ids) or self.tokenizer.decode(ids, skip_special_tokens=False) != "".join(pieces):
            return None
        return ids

    # ----------------------------------------------------------------- chat (text-level)
    async def _chat(self, client, request: GenerationRequest, url: str) -> Completion:
        if not request.messages:
            raise ServerError(f"endpoint=chat needs the conversation as messages, and this request carries none "
                              f"(server {url}, model {self.model!r})")
        kwargs = self._common(request)
        if request.tools:
            kwargs["tools"] = list(request.tools)
        try:
            resp = await client.chat.completions.create(
                messages=[_openai_message(m) for m in request.messages], logprobs=True, **kwargs)
        except self._openai.OpenAIError as e:
            raise self._error("POST /chat/completions", e, url) from e
        choice = _only_choice(resp, url, self.model)
        data = choice.to_dict() if hasattr(choice, "to_dict") else dict(choice)
        message = data.get("message") or {}
        text = (message.get("content") or "") + _hermes_calls(message.get("tool_calls") or [])
        server_finish, stop_reason = data.get("finish_reason"), data.get("stop_reason")
        if server_finish == "tool_calls":
            server_finish = "stop"
        if server_finish == "stop" and isinstance(stop_reason, str) and not text.endswith(stop_reason):
            text += stop_reason  # the server dropped the stop text; the hf backend keeps it
        ids, logprobs = self._chat_tokens(text, (data.get("logprobs") or {}).get("content"))
        ended = server_finish == "stop" and not any(x in text for x in request.stop_strings)
        if ended and (not ids or ids[-1] not in self.stop_token_ids):
            ids, logprobs = ids + [self.eos_token_id], logprobs + [math.nan]
        return self._settle(ids, logprobs, request, server_finish, stop_reason, url)

    def _chat_tokens(self, text: str, content: list[dict] | None) -> tuple[list[int], list[float]]:
        """Ids of a chat answer: exact from the logprob pieces when they identify vocabulary entries and
        spell the text, else the policy tokenizer's encoding of the text (log-probs NaN where unknown)."""
        if content:
            pieces = [c.get("token", "") for c in content]
            ids = _ids_from_token_strings(pieces) or self._ids_from_pieces(pieces)
            if ids is not None and self.tokenizer.decode(ids, skip_special_tokens=False) == text:
                return ids, [float(c.get("logprob", math.nan)) for c in content]
        if not self._warned_logprobs:
            self._warned_logprobs = True
            log.warning("openai backend: %s (%s) gave no per-token log-probs matching its text; chat turns carry "
                        "the policy tokenizer's ids of the text and NaN log-probs (evaluation only)",
                        self.base_url, self.model)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids, [math.nan] * len(ids)

    # ----------------------------------------------------------------- shared
    def _common(self, request: GenerationRequest) -> dict[str, Any]:
        """Fields both endpoints take: model, budget, sampling, seed, stop strings (omitted when none)."""
        s = request.sampling
        out: dict[str, Any] = {"model": self.model, "max_tokens": request.max_new_tokens, "temperature": s.temperature,
                               "top_p": s.top_p, "seed": request.seed % (1 << 31)}
        if request.stop_strings:
            out["stop"] = list(request.stop_strings)
        return out

    def _settle(self, ids: list[int], logprobs: list[float], request: GenerationRequest, server_finish: str | None,
                stop_reason: Any, url: str) -> Completion:
        """Cut after the first token where the hf rule stops and name the finish reason."""
        budget = request.max_new_tokens
        for n in range(1, len(ids) + 1):
            reason = finish_reason(ids[:n], budget, self.stop_token_ids, request.stop_strings, self.tokenizer)
            if reason is not None:
                return Completion(tuple(ids[:n]), tuple(logprobs[:n]), reason)
        if server_finish == "length" or (server_finish == "stop" and not ids):
            return Completion(tuple(ids), tuple(logprobs), "length")
        raise ServerError(f"{url} (model {self.model!r}) ended a completion with finish_reason="
                          f"{server_finish!r}, stop_reason={stop_reason!r} after {len(ids)} tokens, but neither an "
                          f"end-of-turn token {sorted(self.stop_token_ids)} nor a stop string "
                          f"{list(request.stop_strings)} nor the budget ({budget}) ends it; last tokens "
                          f"{self.tokenizer.decode(ids[-8:], skip_special_tokens=False)!r}")


def _urls(base_url: str | Sequence[str]) -> list[str]:
    return [base_url] if isinstance(base_url, str) else list(base_url)


def _ids_from_token_strings(pieces: Sequence[str]) -> list[int] | None:
    """Ids from vLLM's `token_id:N` logprob tokens (None unless every piece has that form)."""
    if not pieces or not all(isinstance(p, str) and p.startswith(TOKEN_ID_PREFIX) for p in pieces):
        return None
    try:
        return [int(p[len(TOKEN_ID_PREFIX):]) for p in pieces]
    except ValueError:
        return None


def _only_choice(resp, base_url: str, model: str | None):
    choices = getattr(resp, "choices", None)
    if not choices:
        raise ServerError(f"{base_url} (model {model!r}) answered without choices: {str(resp)[:300]}")
    return choices[0]


def _openai_message(m) -> dict[str, Any]:
    """A tirl `Message` (or dict) as an OpenAI chat message; tool-call arguments as JSON text."""
    d = m.to_openai() if hasattr(m, "to_openai") else dict(m)
    if d.get("tool_calls"):
        d["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _json_text(c["function"]["arguments"])}}
                           for c in d["tool_calls"]]
    return d


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _hermes_calls(tool_calls: list[dict]) -> str:
    """Tool calls a chat server parsed out of the text, written back as `<tool_call>` blocks."""
    out = []
    for call in tool_calls:
        fn = call.get("function") or {}
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            arguments = fn.get("arguments")
        out.append("<tool_call>\n" + json.dumps({"name": fn.get("name"), "arguments": arguments}) + "\n</tool_call>")
    return "".join(out)


def _body(e) -> str:
    try:
        return json.dumps(e.body)[:500] if e.body is not None else e.response.text[:500]
    except Exception:  # noqa: BLE001 - only for the message
        return str(e)[:500]
