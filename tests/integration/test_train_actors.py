"""The training job on the actor graph (Coordinator + StageActors on a local Ray): invariants and resume."""
from __future__ import annotations

import json
import pathlib

import pytest
import torch

from raymoe.config import BalanceConfig, FP8Config, DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

pytestmark = pytest.mark.usefixtures("ray_session")


def _run(tmp: pathlib.Path, name: str, dp: int = 1, steps: int = 6, fp8: bool = False, histogram_every: int = 10,
         **train_kw) -> RunConfig:
    train = dict(steps=steps, micro_batch_size=2, num_microbatches=2, checkpoint_every=3, eval_every=3,
                 eval_batches=2, warmup_tokens=200, seed=0)
    train.update(train_kw)
    return RunConfig(
        model=ModelConfig.preset("tiny"),
        parallel=ParallelConfig(dp=dp, num_cpus_per_rank=0.5),
        train=TrainConfig(**train),
        data=DataConfig(seq_len=32),
        logger=LoggerConfig(kind="none"),
        balance=BalanceConfig(histogram_every=histogram_every),
        fp8=FP8Config(enabled=fp8, compile=False),
        run_dir=str(tmp / name),
    )


def _drive(run: RunConfig, inspect: bool = False) -> tuple[dict, dict]:
    import ray

    from raymoe.actors import Coordinator

    coord = Coordinator.remote(run)
    try:
        ray.get(coord.setup.remote(), timeout=300)
        summary = ray.get(coord.run_training.remote(), timeout=600)
        info = {}
        if inspect:
            info["biases"] = ray.get(coord.inspect.remote("get_biases"))
            info["in_opt"] = ray.get(coord.inspect.remote("bias_in_optimizer"))
            info["params"] = ray.get(coord.inspect.remote("param_state"))
            info["export"] = summary["hf_export"]  # written by the job at the end (train.export_hf)
        ray.get(coord.shutdown.remote(), timeout=60)
        return summary, info
    finally:
        ray.kill(coord)


def test_dp2_balancing_invariants(tmp_path) -> None:
    run = _run(tmp_path, "dp2", dp=2, steps=4, histogram_every=1)
    summary, info = _drive(run, inspect=True)
    assert summary["finished"] and summary["steps"] == 4
    rows = [json.loads(l) for l in open(pathlib.Path(run.run_dir) / "metrics.jsonl")]
    counted = [r for r in rows if "balance/counts" in r]
    assert counted, "expert counts were never logged"
    # train/mtp_loss is the unweighted MTP cross-entropy (what val/mtp_loss measures): the objective is main + λ·it
    lam = run.train.mtp_lambda
    for r in (r for r in rows if "train/loss" in r):
        want = r["train/main_loss"] + lam * r["train/mtp_loss"] + r["train/aux_loss"]
        assert abs(r["train/loss"] - want) <= 1e-5 * r["train/loss"], r
        assert r["train/mtp_loss"] > r["train/main_loss"] * 0.5  # an unweighted CE, not λ times one
    cfg = run.model
    tokens = run.parallel.dp * run.train.num_microbatches * run.train.micro_batch_size * run.data.seq_len
    mtp_tokens = run.parallel.dp * run.train.num_microbatches * run.train.micro_batch_size * (run.data.seq_len - 1)
    for r in counted:
        per_layer = torch.tensor(r["balance/counts"]).sum(-1).tolist()
        # every routed token counted exactly k times, all micro-batches and both DP ranks, MTP layer included
        assert per_layer == [tokens * cfg.num_experts_per_tok] * cfg.num_moe_layers + [mtp_tokens * cfg.num_experts_per_tok]
    # the replicas' biases are the sign rule replayed on the logged global counts (an independent reference)
    from raymoe.balance import BiasBalancer

    ref = BiasBalancer(cfg.num_router_layers, cfg.n_routed_experts, gamma=run.balance.gamma, rule=run.balance.rule)
    for r in counted:
        ref.update(torch.tensor(r["balance/counts"]))
    b0, b1 = info["biases"]
    assert torch.equal(b0, ref.bias) and torch.equal(b1, ref.bias), "replica biases differ from the replayed sign rule"
    assert info["in_opt"] == [False, False]
    p0, p1 = info["params"]
    assert p0.keys() == p1.keys()
    diverged = [n for n in p0 if not torch.equal(p0[n], p1[n])]
    assert not diverged, f"replicas' weights diverged: {diverged[:5]}"
    assert b0[-1].abs().sum() > 0, "MTP layer bias was never updated"
    # bias survives HF export
    from raymoe.model import hf

    exported = hf.load(info["export"])
    assert torch.equal(exported.expert_biases(), b0)
    # what serving needs beside the weights: the tokenizer, the end-of-text id, the measured expert load
    import tokenizers
    from safetensors import safe_open

    export = pathlib.Path(info["export"])
    tok = tokenizers.Tokenizer.from_file(str(export / "tokenizer.json"))
    eos = json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    assert tok.decode([eos], skip_special_tokens=False) != "" and eos < cfg.vocab_size
    # transformers' tokenizer loads the export offline, knows the special tokens and renders our chat template
    import transformers

    from raymoe.engine.chat import ChatTemplate

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(export))
    assert hf_tok.eos_token_id == eos and hf_tok.pad_token_id == eos
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ChatTemplate.from_dir(export).render(msgs)
    with safe_open(str(export / "expert_load.safetensors"), framework="pt") as f:
        load = f.get_tensor("expert_load")
        assert int(f.metadata()["window_steps"]) == 4
    # the window (balance.load_window_steps=50 > 4 steps) holds every step's global counts
    assert torch.equal(load, sum(torch.tensor(r["balance/counts"]) for r in counted).float())
    assert 0 < summary["mtp_acceptance"] <= 1


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory) -> dict:
    """The uninterrupted 6-step fp32 run (dp=1, checkpoints at 3 and 6), made once and shared by the resume, corrupt
    checkpoint and FP8 tests: ``{"summary": ..., "run_dir": ...}``."""
    run = _run(tmp_path_factory.mktemp("fp32"), "full", steps=6)
    summary, _ = _drive(run)
    assert summary["finished"] and summary["steps"] == 6
    return {"summary": summary, "run_dir": pathlib.Path(run.run_dir)}


def test_interrupted_run_resumes_to_the_same_losses(tmp_path, fp32_run) -> None:
    full = fp32_run["summary"]
    part1, _ = _drive(_run(tmp_path, "resumed", steps=6, stop_after_steps=3))
    assert part1["steps"] == 3 and not part1["finished"]
    part2, _ = _drive(_run(tmp_path, "resumed", steps=6))
    assert part2["resumed_from"].endswith("step_00000003")
    assert part2["steps"] == 6
    assert part2["losses"] == full["losses"], (part2["losses"], full["losses"])


def test_corrupt_latest_checkpoint_falls_back(tmp_path, fp32_run) -> None:
    import shutil

    ckpts = sorted((fp32_run["run_dir"] / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts][-2:] == ["step_00000003", "step_00000006"]
    # a copy of the finished run's checkpoints (the shared run stays intact), its newest one damaged
    run = _run(tmp_path, "corrupt", steps=8)
    for c in ckpts:
        shutil.copytree(c, pathlib.Path(run.run_dir) / "checkpoints" / c.name)
    victim = pathlib.Path(run.run_dir) / "checkpoints" / "step_00000006" / "coordinator.safetensors"
    victim.write_bytes(victim.read_bytes()[:-7] + b"garbage")
    summary, _ = _drive(run)
    assert summary["resumed_from"].endswith("step_00000003")
    assert summary["steps"] == 8


def test_fp8_training_through_deepspeed_resumes_exactly(tmp_path, fp32_run) -> None:
    """fp8=blockwise on the actor graph: Linears swapped before deepspeed.initialize, losses close to (but not
    equal to) the fp32 run, and an interrupted FP8 run resumes to the same losses (the per-step FP8 weight cache is
    dropped after the DeepSpeed checkpoint load)."""
    ref = fp32_run["summary"]
    full, _ = _drive(_run(tmp_path, "fp8full", steps=6, fp8=True))
    assert full["finished"] and full["steps"] == 6
    rel = [abs(a - b) / b for a, b in zip(full["losses"], ref["losses"])]
    assert max(rel) < 0.02, rel  # FP8 tracks the fp32 curve ...
    assert max(rel) > 0, "FP8 losses equal the fp32 losses bit for bit: no layer was converted"  # ... but is FP8
    part1, _ = _drive(_run(tmp_path, "fp8res", steps=6, fp8=True, stop_after_steps=3))
    part2, _ = _drive(_run(tmp_path, "fp8res", steps=6, fp8=True))
    assert part2["resumed_from"].endswith("step_00000003")
    assert part2["losses"] == full["losses"], (part2["losses"], full["losses"])
