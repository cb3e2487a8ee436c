"""Training-side units without Ray: Hydra config tree, LR schedule, atomic checkpoints, metrics sink."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module

from raymoe import checkpoint as ckpt
from raymoe.config import LoggerConfig, ModelConfig, RunConfig, TrainConfig
from raymoe.jobs.configs import InvalidConfig, flat_keys, register, to_run_config
from raymoe.metrics import MetricsLogger
from raymoe.optim import GuardedAdamW, lr_at

CONF = pathlib.Path(__file__).resolve().parents[2] / "conf"
register()


def _compose(*overrides: str) -> RunConfig:
    with initialize_config_module(version_base="1.3", config_module="raymoe.conf"):
        cfg = compose(config_name="train", overrides=[*overrides, "run_dir=/tmp/raymoe-test"])
    return to_run_config(cfg)


def test_default_config_composes() -> None:
    run = _compose()
    assert run.model == ModelConfig.preset("tiny").replace(mtp_loss_weight=run.train.mtp_lambda)
    assert run.parallel.dp == 1 and run.fp8.enabled is False and run.balance.gamma == 1e-3
    assert run.tokens_per_step == 8 * 128


@pytest.mark.parametrize("name", ModelConfig.preset_names())
def test_model_yaml_mirrors_preset(name: str) -> None:
    data = yaml.safe_load((CONF / "model" / f"{name}.yaml").read_text())
    preset = dataclasses.asdict(ModelConfig.preset(name))
    preset.pop("mtp_loss_weight"), preset.pop("seq_aux_loss_alpha")
    assert data == preset


def test_overrides_and_groups() -> None:
    run = _compose("model=small", "train.steps=500", "balance.gamma=0.002", "parallel=dp2", "fp8=blockwise",
                   "balance=aux_loss")
    assert run.model.name == "small" and run.train.steps == 500 and run.parallel.dp == 2
    assert run.fp8.enabled and run.balance.alpha == 1e-3 and run.model.seq_aux_loss_alpha == 1e-3
    exp = _compose("+experiment=balance_ablation")
    assert exp.experiment == "balance_ablation" and exp.model.name == "small"
    from raymoe.jobs.balance_ablation import variant_knobs

    assert [variant_knobs(exp, n) for n in ("none", "aux_loss", "aux_free")] == [
        {"gamma": 0.0, "alpha": 0.0}, {"gamma": 0.0, "alpha": 1e-3}, {"gamma": 1e-3, "alpha": 0.0}]
    fast = _compose("+experiment=balance_ablation", "balance.gamma=0.01")
    assert variant_knobs(fast, "aux_free")["gamma"] == 0.01 and variant_knobs(fast, "none")["gamma"] == 0.0


@pytest.mark.parametrize(
    "override, needle",
    [
        ("model.n_group=3", "model.n_routed_experts=8 must be divisible by model.n_group=3"),
        ("parallel.pp=2", "parallel.pp=2"),
        ("balance.rule=xx", "balance.rule='xx'; allowed: sign, proportional"),
        ("data.seq_len=5000", "exceeds model.max_position_embeddings"),
        ("train.dtype=fp16", "train.dtype='fp16'; allowed: float32, bfloat16"),
        ("data.vocab_size=9000", "exceeds model.vocab_size"),
        ("model.seq_aux_loss_alpha=0.5", "set balance.alpha instead"),
        ("train.storage_path=s3:///run", "train.storage_path 's3:///run' names no bucket"),
        ("train.storage_path=runs/here", "train.storage_path 'runs/here' is relative"),
    ],
)
def test_invalid_combinations_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(InvalidConfig, match=needle.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        _compose(override)


def test_unknown_key_is_rejected_by_the_schema() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="train.nosuchkey"):
        _compose("train.nosuchkey=1")


def test_composed_config_keys_are_deliberate() -> None:
    """A new knob must be added here on purpose (torchtitan's habit)."""
    with initialize_config_module(version_base="1.3", config_module="raymoe.conf"):
        cfg = compose(config_name="train", overrides=["run_dir=/x"])
    keys = flat_keys(cfg)
    top = sorted({k.split(".")[0] for k in keys})
    assert top == ["balance", "data", "elastic", "experiment", "fp8", "logger", "model", "parallel", "ray", "run_dir",
                   "train"]
    expected_train = sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert sorted(k.split(".", 1)[1] for k in keys if k.startswith("train.")) == expected_train
    assert "train.storage_path" in keys  # added with raymoe.storage (docs/storage.md)
    assert sorted(k.split(".", 1)[1] for k in keys if k.startswith("data.")) == [  # docs/data.md
        "cache_dir", "corpus", "seq_len", "source", "text_column", "token_column", "tokenizer", "val_fraction",
        "val_source", "vocab_size", "weights"]
    assert len(keys) == 111, (len(keys), keys)
    assert "parallel.overlap_a2a" in keys  # overlapped expert all-to-all (raymoe.experts.overlap, docs/schedules.md)
    assert "elastic.recovery" in keys  # handoff | checkpoint (docs/cluster.md, raymoe.train.handoff)
    assert "train.init_from" in keys  # pretrained weights in (docs/models.md)


# ------------------------------------------------------------------ LR schedule (V3 numbers, in tokens)
def test_v3_learning_rate_schedule() -> None:
    T = 10**12
    warm = 2000 * 3072 * 4096  # 2K steps at the initial 3072 x 4K batch
    kw = dict(lr=2.2e-4, min_lr=2.2e-5, warmup_tokens=warm, constant_tokens=10 * T - warm, decay_tokens=int(4.3 * T),
              total_tokens=int(14.8 * T))
    assert lr_at(warm // 2, **kw) == pytest.approx(1.1e-4)
    assert lr_at(warm, **kw) == pytest.approx(2.2e-4)
    assert lr_at(int(9.99 * T), **kw) == pytest.approx(2.2e-4)
    assert lr_at(int(12.15 * T), **kw) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-3)
    assert lr_at(int(14.3 * T), **kw) == pytest.approx(2.2e-5)
    assert lr_at(int(14.7 * T), **kw) == pytest.approx(2.2e-5)


def test_guarded_adamw_skips_exactly_one_step() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.full((3,), float("nan"))
    opt.skip_next = True
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.skipped_steps == 1 and not opt.state
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p.detach() < 1)


def test_guarded_adamw_is_fused_and_matches_reference_adamw() -> None:
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 32))
    b = torch.nn.Parameter(a.detach().clone())
    fused = GuardedAdamW([a], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(5):
        g = torch.randn(64, 32)
        a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
    assert not torch.equal(a.detach(), torch.zeros_like(a))
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ checkpoints
def _make(root: pathlib.Path, step: int) -> pathlib.Path:
    tmp = ckpt.new_tmp_dir(root, step)
    (tmp / "stage0").mkdir()
    (tmp / "stage0" / "w.bin").write_bytes(bytes(range(256)) * step)
    torch.save({"step": step}, tmp / "coordinator.pt")
    return ckpt.commit(tmp, step)


def test_checkpoints_are_atomic_and_verified(tmp_path, caplog) -> None:
    root = tmp_path / "checkpoints"
    a, b = _make(root, 1), _make(root, 2)
    assert ckpt.latest_valid(root) == b
    stray = ckpt.new_tmp_dir(root, 3)  # a crashed writer leaves only a temp dir
    (stray / "coordinator.pt").write_bytes(b"partial")
    assert ckpt.list_checkpoints(root) == [a, b]
    data = (b / "stage0" / "w.bin").read_bytes()
    (b / "stage0" / "w.bin").write_bytes(data[:-1] + b"\x00")
    with caplog.at_level(logging.WARNING):
        assert ckpt.latest_valid(root) == a
    assert "checksum mismatch" in caplog.text and "falling back" in caplog.text
    (a / "manifest.json").unlink()
    assert ckpt.latest_valid(root) is None
    with pytest.raises(ckpt.CheckpointCorrupt, match="manifest.json missing"):
        ckpt.verify(a)


def test_prune_keeps_newest(tmp_path) -> None:
    root = tmp_path / "c"
    for s in range(1, 6):
        _make(root, s)
    ckpt.prune(root, 2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000004", "step_00000005"]


# ------------------------------------------------------------------ metrics
def test_metrics_logger_jsonl_and_offline_wandb(tmp_path) -> None:
    log = MetricsLogger(tmp_path / "run", LoggerConfig(kind="wandb", mode="offline"), {"a": 1})
    log.log({"train/loss": 2.5, "balance/counts": [[1, 2], [3, 4]], "balance/bias": [[0.1, -0.1], [0, 0]]}, step=1)
    log.summary({"final": 1.0})
    log.finish()
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows == [{"step": 1, "train/loss": 2.5, "balance/counts": [[1, 2], [3, 4]], "balance/bias": [[0.1, -0.1], [0, 0]]}]
    runs = list((tmp_path / "run" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    quiet = MetricsLogger(tmp_path / "quiet", LoggerConfig(kind="none"), {})
    quiet.log({"train/loss": 1.0}, step=1)
    quiet.finish()
    assert quiet.wandb_dir is None and not (tmp_path / "quiet" / "wandb").exists()
