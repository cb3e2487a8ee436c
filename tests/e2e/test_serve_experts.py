"""The Serve app with redundant experts (in-process shards in the engine replica): the placement is seeded from
the checkpoint's expert_load.safetensors, greedy completions over HTTP equal the local-experts engine token for
token, and the redundancy policy scales the shard count up under a skewed prompt mix while requests keep flowing;
serving metrics reach the JSONL sink."""
from __future__ import annotations

import concurrent.futures as cf
import json
import warnings

import pytest

openai = pytest.importorskip("openai")

from raymoe.engine import EngineConfig, LLMEngine, SamplingParams, write_expert_load  # noqa: E402
from serving_helpers import free_port, tiny_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")
MODEL = "tiny-experts"
ENGINE = {"block_size": 8, "num_blocks": 256, "num_speculative_tokens": 1, "max_num_batched_tokens": 128,
          "prefill_chunk": 64}
PROMPTS = ["The river runs", "The draft model guesses"]
SKEWED = ["She counted the stars: one, two, three, four, five"] * 4  # one prompt kind: a few hot experts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    path = tiny_checkpoint(tmp_path_factory.mktemp("serve_experts"), MODEL)
    g = torch.Generator().manual_seed(0)
    # Beside the checkpoint dir, named by experts.load_file (the default <ckpt>/expert_load.safetensors, which the
    # training export writes, is covered by tests/unit/test_placement.py).
    write_expert_load(path.parent / "load", torch.empty(3, 8).log_normal_(0.0, 1.0, generator=g) * 100,
                      window_steps=10, step=10)
    return path


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    from raymoe.jobs.serve import start_server, stop_server

    mdir = tmp_path_factory.mktemp("serve_metrics")
    experts = {"backend": "replicated", "load_file": str(ckpt.parent / "load" / "expert_load.safetensors"), "num_shards": 2, "redundant_slots": 0, "min_shards": 2, "max_shards": 3,
               "decide_every_steps": 5, "metrics_dir": str(mdir), "metrics_every_steps": 5,
               "policy": {"up_balance": 1.02, "down_balance": 1.01, "patience": 1, "cooldown_s": 0,
                          "min_tokens": 32, "rollback_drop": 0.99}}
    args = {"model_path": str(ckpt), "served_model_name": MODEL, "engine": ENGINE, "experts": experts,
            "autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}}
    url = start_server(args, "127.0.0.1", free_port(), num_cpus=2, timeout_s=120)
    yield url, mdir
    stop_server()


def _info():
    from ray import serve

    return serve.get_deployment_handle("EngineDeployment", app_name="raymoe").info.remote().result()


def test_replicated_serving_matches_local_and_scales_up(server, ckpt) -> None:
    import torch

    url, mdir = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    info = _info()["experts"]
    assert info["backend"] == "replicated" and info["placement_source"].startswith("load-file(step=10")
    assert info["num_shards"] == 2 and info["num_slots"] == 8
    torch.set_num_threads(1)
    local = LLMEngine.from_pretrained(ckpt, EngineConfig(**ENGINE))
    sp = SamplingParams(max_tokens=12, temperature=0)
    for p in PROMPTS:
        got = client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text
        assert got == local.generate([p], sp)[0].outputs[0].text, p
    # a skewed concurrent mix: the policy (up_balance 1.02) adds a shard; every request still completes
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=16,
                                                               temperature=0).choices[0].text, SKEWED))
    ref = local.generate([SKEWED[0]], SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text
    assert outs == [ref] * len(SKEWED)
    info = _info()["experts"]
    ups = [d for d in info["decisions"] if d["action"] == "add"]
    assert ups and info["num_shards"] == 3 and info["redundant_slots"] == 4, info
    assert all(d["pause_s"] < 2.0 for d in ups)
    # after the scale-up the tokens are still the local engine's
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
    assert got == local.generate([PROMPTS[0]], sp)[0].outputs[0].text
    files = list(mdir.glob("replica-*/metrics.jsonl"))
    assert files
    recs = [json.loads(l) for l in files[0].read_text().splitlines()]
    assert any(r.get("serving/num_shards") == 3 for r in recs)
    assert "serving/train_expert_load" in recs[0] and len(recs[0]["serving/train_expert_load"]) == 3
