"""``train.init_from``: a checkpoint saved by transformers starts a run whose first-step loss is transformers' own loss
on the same batch; the model config comes from the checkpoint and contradicting overrides are refused."""
from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from raymoe.config import ModelConfig, RunConfig
from raymoe.jobs.configs import InvalidConfig, register, to_run_config
from raymoe.jobs.local_cluster import free_port
from raymoe.model import DeepSeekV3, hf

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
register()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 4096  # the bundled corpus' cached BPE vocabulary (tests share the data cache)


def hf_tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32,
                qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
                routed_scaling_factor=2.5)
    base.update(kw)
    return transformers.DeepseekV3Config(**base)


def save_hf_tiny(path: pathlib.Path, seed: int = 0):
    """A DeepseekV3 saved by transformers, with non-zero router biases; returns the (eval) transformers model."""
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(hf_tiny_config()).eval()
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    m.save_pretrained(path)
    return m


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("init") / "hf"
    return path, save_hf_tiny(path)


def compose_run(*overrides: str) -> RunConfig:
    with initialize_config_module(version_base="1.3", config_module="raymoe.conf"):
        cfg = compose(config_name="train", overrides=[*overrides, "run_dir=/tmp/raymoe-test"])
    return to_run_config(cfg)


def test_model_config_comes_from_the_checkpoint(hf_ckpt) -> None:
    path, ref = hf_ckpt
    run = compose_run(f"train.init_from={path}", "model.n_routed_experts=8")  # agrees: accepted
    assert run.model.hidden_size == 64 and run.model.num_hidden_layers == 3 and run.model.qk_nope_head_dim == 16
    assert run.model.num_nextn_predict_layers == 0  # transformers wrote no MTP tensors
    assert run.model.vocab_size == ref.config.vocab_size


def test_contradicting_override_is_refused_in_one_line(hf_ckpt) -> None:
    path, _ = hf_ckpt
    with pytest.raises(InvalidConfig) as e:
        compose_run(f"train.init_from={path}", "model.hidden_size=96")
    msg = str(e.value)
    assert "\n" not in msg and "model.hidden_size=96" in msg and "hidden_size=64" in msg, msg
    with pytest.raises(InvalidConfig, match="no config.json"):
        compose_run(f"train.init_from={path.parent}")
    with pytest.raises(InvalidConfig, match="train.init_from 'rel/dir' is relative"):
        compose_run("train.init_from=rel/dir")


@pytest.mark.parametrize("impl", ["native", "deepspeed"])
def test_first_step_loss_equals_transformers(hf_ckpt, tmp_path, impl) -> None:
    from raymoe.data import ResumableSampler, open_datasets, prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    path, ref = hf_ckpt
    run = compose_run(f"train.init_from={path}", f"parallel.dp_impl={impl}", "data.seq_len=32", "train.steps=3",
                      "train.micro_batch_size=2", "train.warmup_tokens=0", "train.resume=never", "logger=none",
                      "train.export_hf=false", "train.checkpoint_every=100", "train.eval_every=100")
    run.run_dir = str(tmp_path / "run")
    info = prepare_data(run, progress=False)
    port = free_port("127.0.0.1")
    group = LocalWorkerGroup(run, port)
    ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
    first_plan = []
    inner = group.step

    def step(plans):
        first_plan.append(plans[0])
        return inner(plans)

    group.step = step  # type: ignore[method-assign]
    try:
        ctrl.run_loop()
    finally:
        ctrl.close()
        group.shutdown()
    # the batch of step 0, drawn the way the controller draws it
    train_ds, _ = open_datasets(run)
    ids = ResumableSampler(info["train_samples"], seed=run.train.seed).next_batch(ctrl.global_batch)
    x, y = train_ds.batch(list(ids))
    with torch.no_grad():
        logits = ref(x).logits
    want = float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    got = ctrl.history[0]["train/main_loss"]
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    assert ctrl.history[0]["train/loss"] == got  # no MTP: the checkpoint has none
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in ref.model.layers[1:]])
    assert torch.equal(first_plan[0].biases, biases)  # the balancer starts from the checkpoint's biases
    assert len(ctrl.history) == 3 and all(h["train/loss"] < 9.0 for h in ctrl.history)


def test_load_into_a_pruned_expert_shard_reads_only_its_rows(tmp_path) -> None:
    """A model holding layer 2 and experts 4..7 only gets exactly those tensors of a raymoe export with MTP."""
    torch.manual_seed(1)
    full = DeepSeekV3(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for r in full.routers():
            r.expert_bias.normal_(0, 0.1)
    hf.save(full, tmp_path / "export")
    cfg = full.config
    torch.manual_seed(2)
    part = DeepSeekV3(cfg)
    part.layers[0] = torch.nn.Identity()  # pruned layers hold nothing
    part.layers[1] = torch.nn.Identity()
    part.layers[2].mlp.experts = part.layers[2].mlp.experts.shard([4, 5, 6, 7])
    assert hf.read_config(tmp_path / "export")[1] == cfg.replace(name="hf")
    kept = hf.load_into(part, tmp_path / "export")
    assert kept == []
    want = full.state_dict()
    for name, t in part.state_dict().items():
        if name.endswith("mlp.experts.gate_proj") or name.endswith("mlp.experts.up_proj") or \
                name.endswith("mlp.experts.down_proj"):
            if name.startswith("layers.2."):
                assert torch.equal(t, want[name][4:8]), name
                continue
        assert torch.equal(t, want[name]), name
    assert cfg.num_nextn_predict_layers == 1 and torch.equal(part.mtp[0].eh_proj.weight, full.mtp[0].eh_proj.weight)
    assert torch.equal(hf.expert_biases(tmp_path / "export", cfg), full.expert_biases())


def test_cli_refuses_contradicting_overrides_before_ray(hf_ckpt) -> None:
    """Through the Hydra app (its own override list): exit status 2, one line naming the key and both values."""
    import os
    import subprocess
    import sys

    path, _ = hf_ckpt
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2] / "platform")}
    for override, key, theirs in (("model.hidden_size=128", "model.hidden_size=128", "hidden_size=64"),
                                  ("model=small", "model.", "=")):
        p = subprocess.run([sys.executable, "-m", "raymoe.jobs.train", f"train.init_from={path}", override,
                            "hydra.run.dir=/tmp/raymoe-never"], env=env, capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1, p.stderr
        assert "contradicts train.init_from" in lines[0] and key in lines[0] and theirs in lines[0], lines[0]
