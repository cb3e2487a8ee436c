"""The harness' perplexity equals the training run's ``val/loss``: a real (in-process) training run of the tiny model on
the bundled corpus writes its HF export and the lm-eval task of the samples its ``val/loss`` covers
(:mod:`raymoe.data.evaltask`); lm-evaluation-harness (``local-completions``) then scores that task against the export
served by our Serve app over HTTP, and its ``bits_per_byte`` converts back to the run's ``val/loss``."""
from __future__ import annotations

import json
import math
import os
import pathlib
import warnings

import pytest

lm_eval = pytest.importorskip("lm_eval")

from raymoe.config import (BalanceConfig, DataConfig, LoggerConfig, ModelConfig, ParallelConfig,  # noqa: E402
                           RunConfig, TrainConfig)
from raymoe.data.evaltask import TASK_NAME, val_loss_from_bits_per_byte  # noqa: E402
from serving_helpers import free_port  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny-run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    import torch

    from raymoe.data import prepare_data
    from raymoe.jobs.local_cluster import free_port as any_free_port
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run = RunConfig(
        model=ModelConfig.preset("tiny"), parallel=ParallelConfig(dp=1),
        train=TrainConfig(steps=6, micro_batch_size=2, eval_every=3, eval_batches=3, checkpoint_every=6,
                          warmup_tokens=0, seed=0, resume="never", lr=1e-2),
        data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"), balance=BalanceConfig(gamma=1e-2),
        run_dir=str(tmp_path_factory.mktemp("run")))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = prepare_data(run, progress=False)
        group = LocalWorkerGroup(run, any_free_port("127.0.0.1"))
        ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
        try:
            summary = ctrl.run_loop()
        finally:
            ctrl.close()
            group.shutdown()
    finally:
        torch.set_num_threads(n)
    assert summary["finished"] and summary["hf_export"] and summary["val_loss"] is not None
    return run, summary


@pytest.fixture(scope="module")
def server(trained):
    from raymoe.jobs.serve import start_server, stop_server

    _, summary = trained
    url = start_server({"model_path": summary["hf_export"], "served_model_name": MODEL,
                        "engine": {"block_size": 8, "num_blocks": 64, "num_speculative_tokens": 0,
                                   "max_num_batched_tokens": 64, "prefill_chunk": 64}},
                       "127.0.0.1", free_port(), num_cpus=4, timeout_s=180)
    yield url
    stop_server()


def test_the_run_writes_the_task_of_its_val_samples(trained) -> None:
    run, summary = trained
    meta = summary["val_task"]
    assert "skipped" not in meta, meta
    # val/loss covers eval_batches x micro_batch_size windows of seq_len predicted tokens, overlapping by one token;
    # the harness' API models keep one of max_length's positions for a generated token
    assert meta["samples"] == 6 and meta["tokens"] == 6 * 32 and meta["max_length"] == 34
    task_dir = pathlib.Path(run.run_dir) / "lm_eval"
    assert json.loads((task_dir / "val_task.json").read_text()) == meta
    assert (task_dir / f"{TASK_NAME}.yaml").exists()


def test_harness_perplexity_is_the_runs_val_loss(trained, server) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    _, summary = trained
    meta = summary["val_task"]
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused")
    out = simple_evaluate(
        model="local-completions",
        model_args={"base_url": f"{server}/v1/completions", "model": MODEL, "tokenizer_backend": "huggingface",
                    "tokenizer": summary["hf_export"], "max_length": meta["max_length"],
                    "custom_prefix_token_id": meta["prefix_token_id"], "num_concurrent": 1, "max_retries": 1,
                    "tokenized_requests": True},
        tasks=[TASK_NAME], task_manager=TaskManager(include_path=meta["include_path"]), apply_chat_template=False)
    res = out["results"][TASK_NAME]
    got = val_loss_from_bits_per_byte(res["bits_per_byte,none"], meta)
    assert got == pytest.approx(summary["val_loss"], rel=2e-5, abs=2e-5)
    # the word perplexity it reports is the same log-likelihood over the task's words
    assert res["word_perplexity,none"] == pytest.approx(math.exp(got * meta["tokens"] / meta["words"]), rel=1e-6)



