"""``python -m raymoe.jobs.export``: the HF export of an interrupted run's newest complete checkpoint loads in
transformers with our model's logits; partial and damaged checkpoints are refused; DeepSpeed checkpoints export too."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from raymoe.config import BalanceConfig, DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig
from raymoe.jobs.local_cluster import free_port
from raymoe.model import DeepSeekV3, hf
from s3_env import local_s3

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def interrupted_run(work: pathlib.Path, impl: str) -> tuple[RunConfig, dict[str, torch.Tensor], torch.Tensor]:
    """4-step run stopped after step 3 (checkpoints at 2 and 3, no final export); returns the run, the rank's
    parameters and the balancer's biases at the stop."""
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    run = RunConfig(
        model=ModelConfig.preset("tiny"),
        parallel=ParallelConfig(dp=1, dp_impl=impl),
        train=TrainConfig(steps=4, stop_after_steps=3, micro_batch_size=2, checkpoint_every=2, eval_every=100,
                          eval_batches=1, warmup_tokens=0, seed=0, resume="never", lr=1e-2),
        data=DataConfig(seq_len=32), logger=LoggerConfig(kind="none"), balance=BalanceConfig(gamma=1e-2),
        run_dir=str(work / impl),
    )
    info = prepare_data(run, progress=False)
    port = free_port("127.0.0.1")
    group = LocalWorkerGroup(run, port)
    ctrl = TrainController(run, group, info["train_samples"], info["val_samples"], data_info=info)
    try:
        summary = ctrl.run_loop()
        params = group.worker.param_state()
        bias = ctrl.balancer.bias.clone()
    finally:
        ctrl.close()
        group.shutdown()
    assert not summary["finished"] and summary["hf_export"] is None and summary["steps"] == 3
    assert not (pathlib.Path(run.run_dir) / "hf").exists()
    return run, params, bias


def our_model(params: dict[str, torch.Tensor], bias: torch.Tensor) -> DeepSeekV3:
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    model.load_state_dict({**model.state_dict(), **params})
    model.set_expert_biases(bias)
    return model.eval()


@pytest.fixture(scope="module")
def native_run(tmp_path_factory):
    return interrupted_run(tmp_path_factory.mktemp("export"), "native")


def test_export_of_an_interrupted_run_serves_our_logits(native_run, tmp_path) -> None:
    from raymoe.train.export import export_checkpoint, find_checkpoint

    run, params, bias = native_run
    ref = find_checkpoint(run.run_dir)
    assert ref.step == 3  # the newest complete checkpoint
    out = export_checkpoint(ref, tmp_path / "hf")
    ours = our_model(params, bias)
    # bit-identical tensors to an export of the rank's own state
    want = hf.to_hf_state_dict(ours)
    got = {}
    for f in sorted(out.glob("model*.safetensors")):
        got.update(load_file(str(f)))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert bias.abs().sum() > 0  # the balancer moved: biases are really carried
    # side files: tokenizer, generation config (eos = the corpus' end-of-text id), expert load
    assert (out / "tokenizer.json").is_file()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and gen["pad_token_id"] == 0
    load = load_file(str(out / "expert_load.safetensors"))["expert_load"]
    assert load.shape == (run.model.num_router_layers, run.model.n_routed_experts) and load.sum() > 0
    # transformers loads it and computes our logits
    x = torch.randint(0, run.model.vocab_size, (2, 24))
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        a, b = back(x).logits, ours(x).logits
    assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_partial_and_damaged_checkpoints_are_refused(native_run, tmp_path) -> None:
    from raymoe.checkpoint import CheckpointCorrupt
    from raymoe.train.export import find_checkpoint

    run, _, _ = native_run
    work = tmp_path / "run"
    shutil.copytree(run.run_dir, work)
    ck = work / "checkpoints"
    shutil.copytree(ck / "step_00000003", ck / "step_00000005")
    (ck / "step_00000005" / "manifest.json").unlink()  # a writer that died before its manifest
    shutil.copytree(ck / "step_00000003", ck / "step_00000004")
    shard = next((ck / "step_00000004" / "shards").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))  # same size, other bytes
    assert find_checkpoint(str(work)).step == 3  # both skipped for the newest intact one
    with pytest.raises(CheckpointCorrupt, match="partial checkpoint"):
        find_checkpoint(str(ck / "step_00000005"))
    with pytest.raises(CheckpointCorrupt, match="checksum mismatch"):
        find_checkpoint(str(ck / "step_00000004"))
    with pytest.raises(FileNotFoundError, match="nothing to export"):
        find_checkpoint(str(tmp_path / "empty"))


def test_export_cli(native_run, tmp_path) -> None:
    run, params, bias = native_run
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    ok = subprocess.run([sys.executable, "-m", "raymoe.jobs.export", f"checkpoint={run.run_dir}",
                         f"out={tmp_path / 'out'}"], env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "step 3" in ok.stdout and (tmp_path / "out" / "config.json").is_file()
    cfg, _ = hf.read_config(tmp_path / "out")
    assert cfg["num_nextn_predict_layers"] == 1  # the MTP module is exported
    bad = subprocess.run([sys.executable, "-m", "raymoe.jobs.export", f"checkpoint={tmp_path / 'nowhere'}",
                          f"out={tmp_path / 'out2'}"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "nothing to export" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_deepspeed_checkpoint_exports(tmp_path) -> None:
    from raymoe.train.export import export_checkpoint, find_checkpoint

    run, params, bias = interrupted_run(tmp_path, "deepspeed")
    out = export_checkpoint(find_checkpoint(run.run_dir), tmp_path / "hf")
    want = hf.to_hf_state_dict(our_model(params, bias))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def s3():
    with local_s3("weights"):
        yield "s3://weights"


def test_export_from_object_storage_and_init_from_a_uri(native_run, s3, tmp_path) -> None:
    """A run whose checkpoints live in S3 exports from its URI; the export, put in S3, is a valid
    ``train.init_from`` URI (materialized once per node) and serves from the engine."""
    from raymoe.engine import LLMEngine
    from raymoe.storage import Storage
    from raymoe.train.export import export_checkpoint, find_checkpoint
    from raymoe.train.pretrained import load_pretrained, model_config

    run, params, bias = native_run
    uri = f"{s3}/run-a"
    Storage(uri).child("checkpoints").put_dir(pathlib.Path(run.run_dir) / "checkpoints")
    ref = find_checkpoint(uri)
    assert ref.step == 3 and ref.location.startswith("s3://")
    out = export_checkpoint(ref, tmp_path / "hf")
    want = hf.to_hf_state_dict(our_model(params, bias))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    Storage(f"{s3}/export-a").put_dir(out)
    cfg = model_config(f"{s3}/export-a")
    assert cfg.replace(name="tiny", mtp_loss_weight=run.model.mtp_loss_weight) == run.model  # MTP present: kept
    fresh = DeepSeekV3(cfg)
    load_pretrained(fresh, f"{s3}/export-a")
    ours = our_model(params, bias)
    assert all(torch.equal(t, ours.state_dict()[k]) for k, t in fresh.state_dict().items())

    eng = LLMEngine.from_pretrained(out)  # what `make serve MODEL=<out>` loads
    assert eng.tokenizer is not None and eng.eos_token_id == 0
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(eng.model(x).logits, ours(x).logits, rtol=0, atol=1e-5)
