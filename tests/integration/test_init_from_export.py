"""Pretrained weights in and any checkpoint out, on Ray actors in a pp=2 × ep=2 layout: a checkpoint saved by
transformers starts the run with transformers' own first-step loss, and the HF export of the run's mid checkpoint
equals the export of the same weights held by one process (the checkpoint re-sharded into pp=1 × ep=1)."""
from __future__ import annotations

import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from raymoe.config import DataConfig, LoggerConfig, ParallelConfig, RunConfig, TrainConfig
from raymoe.jobs.local_cluster import free_port

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("ray_session")


def _hf_checkpoint(path: pathlib.Path):
    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16,
        qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256)
    m = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    m.save_pretrained(path)
    return m


def test_pp2_ep2_run_from_transformers_weights_and_mid_checkpoint_export(tmp_path) -> None:
    import ray

    from raymoe.actors import Coordinator
    from raymoe.data import ResumableSampler, open_datasets
    from raymoe.model import DeepSeekV3, hf
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup
    from raymoe.train.export import export_checkpoint, find_checkpoint
    from raymoe.train.pretrained import model_config

    ref = _hf_checkpoint(tmp_path / "pretrained")
    model = model_config(str(tmp_path / "pretrained"))
    assert model.num_nextn_predict_layers == 0
    run = RunConfig(
        model=model,
        parallel=ParallelConfig(pp=2, ep=2, dp=1, schedule="1f1b", num_cpus_per_rank=0.25, dp_impl="native"),
        train=TrainConfig(steps=2, micro_batch_size=1, num_microbatches=2, checkpoint_every=1, eval_every=100,
                          eval_batches=1, warmup_tokens=0, seed=0, export_hf=False, resume="never",
                          init_from=str(tmp_path / "pretrained")),
        data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"), run_dir=str(tmp_path / "run"))
    coord = Coordinator.remote(run)
    try:
        info = ray.get(coord.setup.remote(), timeout=300)
        summary = ray.get(coord.run_training.remote(), timeout=600)
        ray.get(coord.shutdown.remote(), timeout=60)
    finally:
        ray.kill(coord)
    assert summary["steps"] == 2

    # first step: transformers' loss on the same global batch (4 sequences: ep 2 x 2 micro-batches x 1)
    train_ds, _ = open_datasets(run)
    ids = ResumableSampler(info["train_samples"], seed=0).next_batch(4)
    x, y = train_ds.batch(list(ids))
    with torch.no_grad():
        want = float(F.cross_entropy(ref(x).logits.flatten(0, 1), y.flatten()))
    assert summary["losses"][0] == pytest.approx(want, rel=1e-5), (summary["losses"], want)

    # the mid checkpoint (step 1 of 2) exported, against the same weights in one process
    mid = find_checkpoint(str(tmp_path / "run" / "checkpoints" / "step_00000001"))
    out = export_checkpoint(mid, tmp_path / "export")
    one = RunConfig(model=model, parallel=ParallelConfig(dp_impl="native"),
                    train=TrainConfig(steps=2, micro_batch_size=1, num_microbatches=4, resume=mid.location,
                                      export_hf=False),
                    data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"), run_dir=str(tmp_path / "one"))
    port = free_port("127.0.0.1")
    group = LocalWorkerGroup(one, port)
    ctrl = TrainController(one, group, info["train_samples"], info["val_samples"])
    try:
        ctrl.resume_if_requested()
        assert ctrl.step == 1
        full = DeepSeekV3(model)
        full.load_state_dict({**full.state_dict(), **group.worker.param_state()})
        full.set_expert_biases(ctrl.balancer.bias)
    finally:
        ctrl.close()
        group.shutdown()
    want_t = hf.to_hf_state_dict(full)
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want_t.keys() and all(torch.equal(got[k], want_t[k]) for k in want_t)
    pre = {n: p for n, p in hf.load(tmp_path / "pretrained").named_parameters()}
    assert any(not torch.equal(p, pre[n]) for n, p in full.named_parameters())  # step 1 trained the weights
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
