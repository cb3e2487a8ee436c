"""`python -m raymoe.jobs.train [overrides]`: the training job (Hydra app over conf/train.yaml).

Compose config → validate (raymoe.config dataclasses; any error exits with status 2 before Ray starts) → connect to
Ray (``RAY_ADDRESS``/``ray.address`` when submitted with ``ray job submit``, else an embedded local Ray) → start the
``Coordinator`` actor → show progress → print where the checkpoint, the wandb run and the summary JSON are.

Examples::

    python -m raymoe.jobs.train                                   # tiny model, bundled Shakespeare, local Ray
    python -m raymoe.jobs.train model=small train.steps=500 balance.gamma=1e-3
    python -m raymoe.jobs.train parallel=dp2 train.resume=auto hydra.run.dir=/abs/runs/x
    python -m raymoe.jobs.train +experiment=balance_ablation
"""
from __future__ import annotations

import os

from raymoe.jobs.cluster import configure_process_env

configure_process_env()  # before `import ray`: embedded (loopback only) or cluster mode, see raymoe.jobs.cluster

import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from omegaconf import DictConfig  # noqa: E402

from raymoe.config import RunConfig  # noqa: E402
from raymoe.jobs.configs import hydra_app, register, to_run_config  # noqa: E402

register()


def init_ray(run: RunConfig) -> str:
    """Connect to ``ray.address``/``RAY_ADDRESS`` (shipping this code to every worker) or start an embedded Ray."""
    from raymoe.jobs.cluster import connect

    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "RAYMOE_CACHE_DIR")
           if k in os.environ}
    return connect(run.ray.address, num_cpus=run.ray.num_cpus or max(4, run.parallel.world_size * 2),
                   object_store_mb=run.ray.object_store_mb, include_dashboard=run.ray.include_dashboard,
                   env_vars=env, log_to_driver=True)


def train(run: RunConfig, progress: bool = True) -> dict[str, Any]:
    """Run a training job to completion on the connected (or a new local) Ray and return the summary."""
    import ray
    from tqdm import tqdm

    from raymoe.actors import Coordinator

    mode = init_ray(run)
    import raymoe

    print(f"raymoe {raymoe.__version__} ({pathlib.Path(raymoe.__file__).parent}) on Ray ({mode}: "
          f"{len([n for n in ray.nodes() if n.get('Alive')])} node(s))", flush=True)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # the coordinator lives on the driver's node: losing a worker node must not take the run's brain with it
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coord = Coordinator.options(scheduling_strategy=here).remote(run)
    try:
        info = ray.get(coord.setup.remote())
        start = info.get("start_step", 0)
        if info.get("resumed_from"):
            print(f"resumed from {info['resumed_from']} at step {start}")
        fut = coord.run_training.remote()
        bar = tqdm(total=run.train.steps, initial=start, desc="train", unit="step", disable=not progress,
                   dynamic_ncols=True)
        last = start
        while True:
            done, _ = ray.wait([fut], timeout=0.5)
            st = ray.get(coord.status.remote())
            step = st.get("step", last)
            if step > last:
                bar.update(step - last)
                last = step
            if "loss" in st:
                bar.set_postfix(loss=f"{st['loss']:.3f}", tok_s=f"{st.get('tokens_per_s', 0):.0f}",
                                maxvio=f"{st.get('maxvio', 0):.2f}", refresh=False)
            if done:
                break
        bar.close()
        summary = ray.get(fut)
        ray.get(coord.shutdown.remote())
        return summary
    finally:
        ray.kill(coord)


def run_from_cfg(cfg: DictConfig) -> dict[str, Any]:
    run = to_run_config(cfg)
    run.run_dir = str(pathlib.Path(run.run_dir).resolve())
    if run.experiment == "balance_ablation":
        from raymoe.jobs.balance_ablation import run_ablation

        return run_ablation(run)
    t0 = time.time()
    summary = train(run)
    print(
        f"\nfinished {summary['steps']} steps in {time.time() - t0:.0f}s: train loss {summary['final_train_loss']:.4f}"
        + (f", val loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else "")
        + (f", MaxVio_global {summary['maxvio_global']:.3f}" if summary.get("maxvio_global") is not None else "")
    )
    print(f"checkpoint : {summary['checkpoint']}")
    print(f"wandb run  : {summary['wandb_dir'] or '(logger=none)'}")
    print(f"metrics    : {summary['metrics_file']}")
    if summary.get("hf_export"):
        print(f"HF export  : {summary['hf_export']}  (python -m raymoe.jobs.bench model hf=<it> text=shakespeare)")
    print(f"summary    : {pathlib.Path(run.run_dir) / 'summary.json'}")
    return summary


@hydra_app("train")  # @hydra.main over conf/train.yaml; any invalid override -> one line on stderr, exit status 2
def main(cfg: DictConfig) -> None:
    run_from_cfg(cfg)


if __name__ == "__main__":
    main()
