"""Data-parallel training launched from Ray (`distributed.launcher=ray`): Ray Train's `TorchTrainer`
starts `distributed.num_workers` ranks on the cluster at `cluster.address` (null: a local Ray) and joins
them in a torch.distributed process group (gloo on CPU, nccl when ranks have GPUs); every rank then runs
the pipeline exactly as under torchrun (`tirl.trainer.distributed`: rank 0 logs, evaluates and writes
checkpoints).

    tirl train recipe.yaml distributed.launcher=ray distributed.strategy=ddp distributed.num_workers=8 \
        distributed.worker_gpus=1 cluster.address=auto

The driver (the `tirl train` process) only waits. Ranks run in the driver's working directory with the
run directory made absolute, so relative paths in the recipe mean the same on every rank; across nodes
that directory (and `run.dir`) must be on a shared filesystem, as under torchrun. Ray Train's own
bookkeeping goes to a temporary directory, removed afterwards; checkpoints are tirl's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from tirl.errors import TirlError


def launch(cfg) -> None:
    """Run the pipeline of `cfg` on Ray Train workers; raises `TirlError` with the ranks' failure."""
    from tirl.cluster import connect, require_ray

    require_ray()
    try:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as e:
        raise TirlError(f"distributed.launcher=ray needs Ray Train: pip install 'ray[train]' ({e})") from None
    connect(cfg.cluster)
    d = cfg.distributed
    run_dir = cfg.run_dir().resolve()
    pinned = cfg.model_copy(update={"run": cfg.run.model_copy(update={"dir": str(run_dir)})})
    backend = d.backend if d.backend != "auto" else ("nccl" if d.worker_gpus > 0 else "gloo")
    resources = {"CPU": d.worker_cpus, **({"GPU": d.worker_gpus} if d.worker_gpus else {})}
    storage = tempfile.mkdtemp(prefix="tirl-ray-train-")
    trainer = TorchTrainer(
        run_rank, train_loop_config={"config": pinned.model_dump(mode="json"), "cwd": os.getcwd()},
        torch_config=TorchConfig(backend=backend, timeout_s=int(d.timeout_s)),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.worker_gpus > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"tirl-{cfg.run.name}", storage_path=storage))
    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - Ray Train wraps the ranks' errors in its own types
        raise TirlError(f"distributed.launcher=ray: the training ranks failed: {e}") from e
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if getattr(result, "error", None) is not None:
        raise TirlError(f"distributed.launcher=ray: the training ranks failed: {result.error}") from result.error


def run_rank(config: dict[str, Any]) -> None:
    """One rank (runs in a Ray Train worker, whose process group is set up): the whole pipeline."""
    os.chdir(config["cwd"])
    from tirl.config import Config
    from tirl.trainer.pipeline import run_pipeline

    run_pipeline(Config.model_validate(config["config"]))
