"""Where the work runs: the generation backend (hf, vLLM in-process, an OpenAI-compatible server fleet),
Ray workers (`cluster`) and torch.distributed data parallelism (`distributed`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tirl.config.base import _Section


class OpenAIBackendConfig(_Section):
    base_url: str | list[str] = Field("http://127.0.0.1:8000/v1", description=(
        "The server's OpenAI-compatible /v1 URL, or a list of them (a fleet serving the same model: requests "
        "are spread over the servers, every turn of a trajectory going to the same one)."))
    model: str | None = Field(None, description="Model name the server knows (default: the one model it serves, "
                                                 "from GET /models).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key (may be unset).")
    endpoint: Literal["auto", "completions", "chat"] = Field(
        "auto", description="completions: token ids in and out (exact; needed for training); chat: chat "
                            "completions (text; evaluation only); auto: completions where the server allows.")
    max_concurrency: int = Field(64, ge=1, description="Requests in flight at once.")
    request_timeout_s: float = Field(600.0, gt=0, description="Seconds per request.")
    max_retries: int = Field(3, ge=0, description="Retries of connection errors and 429/5xx answers.")
    weight_sync: Literal["none", "vllm_files"] = Field("none", description=(
        "none: the servers keep their model (evaluation only); vllm_files: after every update the trainer "
        "writes its weights as safetensors files under weight_dir and every `vllm serve` server loads them "
        "through its dev-mode /collective_rpc endpoint (see tirl.backends.fleet)."))
    weight_dir: str | None = Field(None, description="Directory every server can read (a shared filesystem, or "
                                                     "local disk when the servers run on this node).")
    weight_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype of the pushed weights (auto: the policy's compute dtype).")

    @model_validator(mode="after")
    def _check_fleet(self) -> OpenAIBackendConfig:
        urls = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        if not urls or not all(urls):
            raise ValueError(f"backend.openai.base_url must be a URL or a non-empty list of them, got "
                             f"{self.base_url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError(f"backend.openai.base_url lists a server twice: {urls}")
        if self.weight_sync == "none":
            for key in ("weight_dir", "weight_dtype"):
                if getattr(self, key) != type(self).model_fields[key].default:
                    raise ValueError(f"backend.openai.{key} has no effect unless backend.openai.weight_sync="
                                     "vllm_files")
            return self
        if not self.weight_dir:
            raise ValueError("backend.openai.weight_sync=vllm_files needs backend.openai.weight_dir: a directory "
                             "every server can read")
        if self.endpoint == "chat":
            raise ValueError("backend.openai.weight_sync=vllm_files needs token-exact completions for training; "
                             "backend.openai.endpoint=chat is text-level (use completions or auto)")
        return self


class VLLMBackendConfig(_Section):
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1)
    max_num_seqs: int = Field(256, ge=1, description="Sequences vLLM schedules at once.")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (slower; faster start).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vllm.LLM(...) arguments.")


class BackendConfig(_Section):
    name: Literal["hf", "vllm", "openai"] = Field("hf", description="Who generates: hf (in-process transformers), "
                                                  "vllm (in-process engine, GPU), openai (an OpenAI-compatible server).")
    scheduling: Literal["async", "sync"] = Field(
        "async", description="hf: async lets each trajectory's turn join the running generation batch as soon as "
                             "it is ready; sync waits for every trajectory of the batch (batch-synchronous).")
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    vllm: VLLMBackendConfig = VLLMBackendConfig()


class ClusterConfig(_Section):
    """RL rollouts on Ray actors (`pip install 'tirl[ray]'`); off: everything runs in this process."""

    enabled: bool = Field(False, description="Run RL rollouts on Ray rollout workers (and tools on tool workers).")
    address: str | None = Field(None, description="null: start a local Ray; 'auto': join the cluster this "
                                                   "machine is part of; 'ray://host:port' or 'host:port': connect.")
    rollout_workers: int = Field(2, ge=1, description="Rollout actors, each with its own generation backend.")
    tool_workers: int = Field(0, ge=0, description="Tool actors running the tools (0: tools run inside the "
                                                   "rollout workers).")
    rollout_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per rollout worker.")
    rollout_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per rollout worker.")
    tool_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per tool worker (tool workers get no GPU).")
    rollout_resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources per rollout worker (e.g. {gen_node: 1}: only nodes started with that resource)."))
    tool_resources: dict[str, float] = Field(default_factory=dict, description=(
        "Custom Ray resources per tool worker (e.g. {tool_node: 1}), keeping tools off the GPU nodes."))
    max_restarts: int = Field(3, ge=0, description="Times Ray restarts a worker whose process died.")
    max_reissues: int = Field(3, ge=0, description="Times one problem's group is re-issued after its worker died.")
    object_store_mb: int | None = Field(None, ge=80, description="Object store size of a locally started Ray "
                                                                 "(null: Ray's default).")

    @model_validator(mode="after")
    def _check_address(self) -> ClusterConfig:
        import re
        a = self.address
        if a is not None and a != "auto" and not re.fullmatch(r"(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{1,5}", a):
            raise ValueError(f"cluster.address={a!r} is not null, 'auto', 'ray://host:port' or 'host:port'")
        return self


class DistributedConfig(_Section):
    """Data-parallel training under torch.distributed, launched by `torchrun --nproc-per-node N -m tirl.cli
    train recipe.yaml` (see `tirl.trainer.distributed`)."""

    strategy: Literal["none", "auto", "ddp", "fsdp2"] = Field("none", description=(
        "none: one process; ddp: every rank holds the whole model, gradients are summed across ranks; "
        "fsdp2: the decoder layers' weights, gradients and optimizer state sharded across ranks (full "
        "fine-tuning only); "
        "auto: ddp when launched by torchrun (WORLD_SIZE set), else none."))
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on CUDA, gloo on CPU.")
    timeout_s: float = Field(3600.0, gt=0, description=(
        "Seconds a collective may wait for the other ranks; it also bounds how long they wait while rank 0 "
        "evaluates alone, so keep it above an evaluation's duration."))
    launcher: Literal["torchrun", "ray"] = Field("torchrun", description=(
        "torchrun: you start the ranks (torchrun --nproc-per-node N -m tirl.cli train ...); ray: `tirl train` "
        "starts distributed.num_workers ranks as Ray Train workers (TorchTrainer) on the Ray cluster at "
        "cluster.address (null: a local Ray), each running the pipeline (tirl.cluster.train)."))
    num_workers: int = Field(2, ge=1, description="launcher=ray: how many ranks.")
    worker_cpus: float = Field(1.0, gt=0, description="launcher=ray: CPUs reserved per rank.")
    worker_gpus: float = Field(0.0, ge=0, description="launcher=ray: GPUs per rank (> 0: ranks on GPU nodes).")

    @model_validator(mode="after")
    def _launcher_settings(self) -> DistributedConfig:
        if self.launcher == "torchrun":
            changed = [k for k in ("num_workers", "worker_cpus", "worker_gpus")
                       if getattr(self, k) != type(self).model_fields[k].default]
            if changed:
                raise ValueError(f"distributed.{changed[0]} has no effect unless distributed.launcher=ray")
        elif self.strategy == "none":
            raise ValueError("distributed.launcher=ray starts ranks for data-parallel training: set "
                             "distributed.strategy to ddp, fsdp2 or auto")
        return self
