"""`python -m raymoe.jobs.prepare_data [overrides]`: tokenize and pack a run's data on Ray Data, ahead of training.

It composes the same config as the training job (``conf/train.yaml``: the ``data.*`` keys and ``model.vocab_size``
mean the same), connects to Ray like it (``RAY_ADDRESS``/``ray.address``, else an embedded local Ray), builds every
``data.source`` with the Ray Data pipeline (:mod:`raymoe.actors.data`), shows Ray Data's progress bars, and prints
what it built as JSON. A later ``python -m raymoe.jobs.train`` with the same ``data.*`` finds the build in the cache
and starts at once; a training run whose shards are missing runs the same pipeline itself.

Examples::

    python -m raymoe.jobs.prepare_data data.source=[/data/corpus/] data.tokenizer=/models/tok model.vocab_size=129280
    python -m raymoe.jobs.prepare_data 'data.source=[s3://bucket/a.parquet,s3://bucket/b/]' data.weights=[3,1] \\
        data.tokenizer=s3://bucket/tokenizer data.text_column=content
    python -m raymoe.jobs.prepare_data          # the bundled corpus (single-process BPE build, no Ray needed)
"""
from __future__ import annotations

import os

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from omegaconf import DictConfig  # noqa: E402

from raymoe.config import RunConfig  # noqa: E402
from raymoe.jobs.configs import hydra_app, register, to_run_config  # noqa: E402

register()


def prepare(run: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Build ``run``'s data (Ray Data for ``data.source``; the bundled corpus in this process) and describe it."""
    from raymoe.data import prepare_data

    if not run.data.source:
        return prepare_data(run, progress=progress)
    from raymoe.data.userdata import DataSpec, check_spec
    from raymoe.jobs.cluster import connect

    check_spec(DataSpec.from_run(run))  # a wrong path, column-less source or tokenizer fails before Ray starts

    env = {k: os.environ[k] for k in ("TOKENIZERS_PARALLELISM", "RAYMOE_CACHE_DIR") if k in os.environ}
    connect(run.ray.address, num_cpus=run.ray.num_cpus, object_store_mb=run.ray.object_store_mb,
            include_dashboard=run.ray.include_dashboard, env_vars=env, log_to_driver=True)
    from raymoe.actors.data import ray_encoder

    return prepare_data(run, progress=progress, encoder=ray_encoder)


@hydra_app("train")
def main(cfg: DictConfig) -> None:
    run = to_run_config(cfg)
    t0 = time.time()
    try:
        info = prepare(run)
    except (ValueError, FileNotFoundError) as e:  # bad data settings: one line naming what is wrong
        raise SystemExit(f"prepare_data: {e}") from None
    info["seconds"] = round(time.time() - t0, 2)
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
