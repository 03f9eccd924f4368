"""Servers for the backend tests, on loopback ports, started once per session.

- `transformers_server`: a real third-party OpenAI-compatible server, `transformers serve`, serving the
  default embedded model from its local directory. It offers /v1/chat/completions and a text-only
  /v1/completions (string prompts, no token ids, no logprobs), so tirl's `auto` endpoint picks chat
  against it. Failing to start it is a test failure, not a skip: the dev extra installs what it needs.
- `completions_server`: a small FastAPI server written here that wraps tirl's own hf backend and
  answers /v1/completions in vLLM's dialect (token-id prompts, `token_ids`, `token_id:N` logprob
  tokens, `include_stop_str_in_output`, `stop_reason`). It is NOT a third-party server: it tests the
  openai backend's token-exact completions path over real HTTP, in addition to the checks against
  `transformers serve`, because no third-party server with token-id completions runs on a CPU here.
- `fleet`: TWO such servers, each with its own copy of the default model, that also answer vLLM's
  dev-mode weight endpoints, `POST /collective_rpc` (method `tirl_load_weights`: load the safetensors
  file, which may hold any part of the weights, and copy its tensors into the server's model with the hf
  backend's `update_weights`, which refuses unknown names; answered like vLLM, `{"results": ["<count>"]}`) and `POST /reset_prefix_cache`. They follow
  vLLM's dev-mode API (vllm/entrypoints/serve/dev/rpc/api_router.py) and are NOT vLLM: they test the
  openai backend's weight route over real HTTP, since vLLM does not run on this CPU.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 240


@dataclass(frozen=True)
class Server:
    """A running server: its /v1 URL and the model name it serves."""

    base_url: str
    model: str


@dataclass
class ServerLog:
    """What a fleet server received (read by the tests), and how it misbehaves when told to."""

    prompts: list[list[int]] = field(default_factory=list)
    """Token-id prompts of the /v1/completions requests, in arrival order."""
    loads: list[str] = field(default_factory=list)
    """Paths loaded through /collective_rpc."""
    resets: int = 0
    """/reset_prefix_cache calls."""
    worker_results: list | None = None
    """When set, /collective_rpc answers these per-worker results after loading (a server whose workers
    disagree), instead of the one worker's true count."""


@dataclass(frozen=True)
class FleetServer(Server):
    """A fleet member, with the record of what it received."""

    log: ServerLog = field(default_factory=ServerLog)
    backend: object = None
    """Its hf backend (its model holds the weights it serves)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, alive, log_tail, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll `url` until it answers 200; fail with the server's log when it dies or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail(f"the server behind {url} exited during start-up; its log ends with:\n{log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s} s; the server's log ends with:\n{log_tail()}")


@pytest.fixture(scope="session")
def served_model_dir(smol_dir, tmp_path_factory) -> Path:
    """The default model's directory, with generation defaults that sample when asked to.

    `transformers serve` samples only where the model's generation_config.json says `do_sample: true`
    (temperature 0 still means greedy), and it would otherwise apply transformers' default top_k=50.
    """
    out = tmp_path_factory.mktemp("served-model")
    for f in Path(smol_dir).iterdir():
        if f.name != "generation_config.json":
            (out / f.name).symlink_to(f.resolve())
    gen = json.loads((Path(smol_dir) / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, "do_sample": True, "top_k": 0, "top_p": 1.0}))
    return out


@pytest.fixture(scope="session")
def transformers_server(served_model_dir, tmp_path_factory):
    """`transformers serve <local dir>` on a free loopback port (CPU, float32)."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.fail("`transformers serve` needs fastapi, uvicorn, pydantic and openai: pip install -e '.[dev]'")
    port = free_port()
    log_path = tmp_path_factory.mktemp("transformers-serve") / "server.log"
    cmd = [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
           "serve", str(served_model_dir), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
           "--dtype", "float32", "--log-level", "warning"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", lambda: proc.poll() is None,
                   lambda: log_path.read_text(errors="replace")[-3000:])
        yield Server(f"http://127.0.0.1:{port}/v1", str(served_model_dir))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------- loopback completions server
def completions_app(backend, tokenizer, model_name: str):
    """A FastAPI app answering /v1/completions (vLLM's dialect) with `backend` (see module docstring)."""
    from fastapi import FastAPI, HTTPException

    from tirl.backends.base import GenerationRequest, SamplingParams

    app = FastAPI()
    app.state.prompts = []

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "tirl-tests"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            raise HTTPException(400, "this test server takes token-id prompts only")
        app.state.prompts.append(list(prompt))
        stop = body.get("stop") or ()
        request = GenerationRequest(
            prompt_ids=tuple(prompt), max_new_tokens=int(body.get("max_tokens") or 16),
            stop_strings=tuple([stop] if isinstance(stop, str) else stop),
            sampling=SamplingParams(float(body.get("temperature", 1.0)), float(body.get("top_p", 1.0))),
            seed=int(body.get("seed") or 0))
        c = await backend.generate(request)
        text = tokenizer.decode(list(c.token_ids), skip_special_tokens=body.get("skip_special_tokens", True))
        stop_reason = next((s for s in request.stop_strings if s in text), None) if c.finish_reason == "stop" else None
        if stop_reason and not body.get("include_stop_str_in_output"):
            text = text[:text.index(stop_reason)]
        as_ids = body.get("return_tokens_as_token_ids")
        choice = {"index": 0, "text": text, "finish_reason": "length" if c.finish_reason == "length" else "stop",
                  "stop_reason": stop_reason,
                  "logprobs": {"tokens": [f"token_id:{t}" if as_ids else tokenizer.decode([t]) for t in c.token_ids],
                               "token_logprobs": list(c.logprobs), "top_logprobs": None, "text_offset": []}}
        if body.get("return_token_ids"):
            choice["token_ids"] = list(c.token_ids)
        return {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": [choice], "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(c.token_ids),
                                               "total_tokens": len(prompt) + len(c.token_ids)}}

    return app


def fleet_app(backend, tokenizer, model_name: str, log: ServerLog):
    """`completions_app` plus vLLM's dev-mode `/collective_rpc` (tirl_load_weights) and `/reset_prefix_cache`
    (see module docstring); records what it receives in `log`."""
    from fastapi import HTTPException
    from safetensors.torch import load_file

    app = completions_app(backend, tokenizer, model_name)
    app.state.prompts = log.prompts

    @app.post("/collective_rpc")
    def collective_rpc(body: dict):
        if body.get("method") != "tirl_load_weights":
            raise HTTPException(400, f"this test server runs only tirl_load_weights, not {body.get('method')!r}")
        [path] = body.get("args") or [None]
        tensors = load_file(path)
        # one file may hold part of the weights (vLLM's load_weights takes any subset): the model's own tensors
        # fill in the rest, and update_weights refuses names the model does not have (answered as HTTP 500)
        backend.update_weights({**backend.model.state_dict(), **tensors})
        log.loads.append(path)
        results = log.worker_results if log.worker_results is not None else [len(tensors)]
        return {"results": [r if r is None or isinstance(r, (dict, list)) else str(r) for r in results]}

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():
        backend.engine.kept.clear()
        log.resets += 1

    return app


def serve_in_thread(app, name: str):
    """Start `app` on a free loopback port in a daemon thread; returns (root URL, stop function)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name=name, daemon=True)
    thread.start()

    def stop():
        server.should_exit = True
        thread.join(timeout=20)

    wait_ready(f"http://127.0.0.1:{port}/v1/models", thread.is_alive, lambda: "(in-process server; see stderr)")
    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="session")
def fleet(smol_dir, smol_tokenizer):
    """Two loopback servers speaking vLLM's completions and dev-mode weight API, each over its own copy of
    the default model (float32, eager) in tirl's hf backend."""
    import torch

    from tirl.backends.hf import HFBackend
    from tirl.models.loading import load_causal_lm

    members, stops = [], []
    try:
        for i in range(2):
            model = load_causal_lm(str(smol_dir), torch.float32, "eager", "cpu")
            backend = HFBackend(model, smol_tokenizer, [smol_tokenizer.eos_token_id], max_context=2048)
            log = ServerLog()
            root, stop = serve_in_thread(fleet_app(backend, smol_tokenizer, "smol-fleet", log), f"fleet-{i}")
            stops.append((stop, backend))
            members.append(FleetServer(f"{root}/v1", "smol-fleet", log, backend))
        yield members
    finally:
        for stop, backend in stops:
            stop()
            backend.close()


@pytest.fixture(scope="session")
def completions_server(smol_model, smol_tokenizer):
    """The loopback vLLM-dialect completions server over tirl's hf backend, in a thread of this process."""
    import uvicorn

    from tirl.backends.hf import HFBackend

    backend = HFBackend(smol_model, smol_tokenizer, [smol_tokenizer.eos_token_id], max_context=2048)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(completions_app(backend, smol_tokenizer, "smol-loopback"),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="completions-server", daemon=True)
    thread.start()
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", thread.is_alive, lambda: "(in-process server; see stderr)")
        yield Server(f"http://127.0.0.1:{port}/v1", "smol-loopback")
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        backend.close()
