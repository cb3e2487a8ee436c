"""Engine replicas without routed experts: expert shards read their slots' rows from the checkpoint
(raymoe.engine.checkpoint_experts, the FETCH op), the engine's model holds attention / dense / shared-expert weights
only (hf.load(routed_experts=False) → AbsentExperts), greedy output equals the local model's, and a shard SIGKILLed in
the middle of a generation has its slots read again from the checkpoint by the survivors with no failed request.

Rows are checked equal to what hf.load stacks (per-expert and transformers-5 fused layouts, a local directory and an
S3 URI), and the bytes read are exactly those rows' bytes (plus the headers read once)."""
from __future__ import annotations

import pathlib
import shutil
import signal
import subprocess

import pytest
import torch

from raymoe.engine import EngineConfig, LLMEngine, ReplicatedExperts, SamplingParams
from raymoe.engine.checkpoint_experts import CheckpointExperts
from raymoe.engine.experts import param_summary
from raymoe.engine.remote import RemoteShard, ShardServer, ShardUnavailable, spawn_shard_processes
from raymoe.model import hf
from raymoe.model.moe import AbsentExperts, RoutedExperts
from s3_env import local_s3

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["The river runs past", "She counted the stars: one, two", "Every expert in the layer reads"]
GEN = 10
SECRET = bytes(range(40, 72))


@pytest.fixture(scope="module")
def full(tiny_ckpt):
    return hf.load(tiny_ckpt)


def _experts(model) -> dict[str, RoutedExperts]:
    out = {f"layers.{i}": l.mlp.experts for i, l in enumerate(model.layers) if hasattr(l.mlp, "experts")}
    out.update({f"mtp.{k}": m.block.mlp.experts for k, m in enumerate(model.mtp)})
    return out


def _check_rows(ce: CheckpointExperts, model, row_bytes: int) -> None:
    """Rows of a few experts (repeats, any order) equal the loaded model's; exactly those rows' bytes were read."""
    before = ce.row_bytes_read
    distinct = 0
    for key, ex in _experts(model).items():
        ids = [5, 0, 5, 7]
        g, u, d = ce.rows(key, ids)
        assert (g.shape, u.shape, d.shape) == ((4, ce.dim, ce.inter_dim),) * 2 + ((4, ce.inter_dim, ce.dim),)
        for j, e in enumerate(ids):
            assert torch.equal(g[j], ex.gate_proj[e]) and torch.equal(u[j], ex.up_proj[e])
            assert torch.equal(d[j], ex.down_proj[e])
        distinct += 3
    assert ce.row_bytes_read - before == distinct * row_bytes


def test_rows_equal_the_loaded_model_and_only_they_are_read(tiny_ckpt, full) -> None:
    ce = CheckpointExperts(str(tiny_ckpt))
    row = 3 * ce.dim * ce.inter_dim * 4  # fp32: gate + up + down of one expert
    _check_rows(ce, full, row)
    assert ce.rows("layers.1", [2], torch.bfloat16)[0].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="outside"):
        ce.rows("layers.1", [ce.num_experts])
    with pytest.raises(ValueError, match="no tensor"):  # layer 0 is dense: it has no routed experts
        ce.rows("layers.0", [0])
    ce.close()


def _fused_copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The checkpoint in transformers 5's fused layout: ``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    per: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    for k in [k for k in tensors if ".mlp.experts." in k]:
        pre, rest = k.split(".mlp.experts.")
        e, proj, _ = rest.split(".")
        per.setdefault(pre, {}).setdefault(proj, {})[int(e)] = tensors.pop(k)
    for pre, projs in per.items():
        E = len(projs["gate_proj"])
        tensors[f"{pre}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([projs["gate_proj"][e], projs["up_proj"][e]]) for e in range(E)])
        tensors[f"{pre}.mlp.experts.down_proj"] = torch.stack([projs["down_proj"][e] for e in range(E)])
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_fused_layout_reads_one_row_per_expert_run(tiny_ckpt, full, tmp_path) -> None:
    fused = _fused_copy(pathlib.Path(tiny_ckpt), tmp_path / "fused")
    ce = CheckpointExperts(str(fused))
    assert "model.layers.1.mlp.experts.gate_up_proj" in ce._where
    # experts 0, 5, 7 (5 repeated): runs [0,1), [5,6), [7,8) -> 3 rows of each fused tensor, nothing else
    _check_rows(ce, full, 3 * ce.dim * ce.inter_dim * 4)


@pytest.fixture(scope="module")
def s3():
    with local_s3("raymoe-ckpt-experts") as server:
        yield server


def test_rows_from_an_s3_checkpoint(tiny_ckpt, full, s3) -> None:
    from raymoe.storage import Storage

    uri = "s3://raymoe-ckpt-experts/model"
    Storage(uri).put_dir(tiny_ckpt)
    ce = CheckpointExperts(uri)
    assert ce._local_root is None  # ranged reads through pyarrow's S3 filesystem, nothing downloaded
    _check_rows(ce, full, 3 * ce.dim * ce.inter_dim * 4)


def test_engine_model_without_routed_experts(tiny_ckpt, full) -> None:
    lean = hf.load(tiny_ckpt, routed_experts=False)
    full_s, lean_s = param_summary(full), param_summary(lean)
    assert lean_s["routed_expert_bytes"] == 0 and lean_s["names_with_routed_experts"] == []
    assert full_s["routed_expert_bytes"] > 0 and full_s["names_with_routed_experts"]
    assert lean_s["bytes"] == full_s["bytes"] - full_s["routed_expert_bytes"]
    exp = dict(full.named_parameters())
    for n, p in lean.named_parameters():  # every weight it holds is the full model's
        assert torch.equal(p, exp[n]), n
    assert all(isinstance(ex, AbsentExperts) for ex in _experts(lean).values())
    with pytest.raises(RuntimeError, match="holds no routed-expert weights"):
        lean.layers[1].mlp.experts.forward_grouped(torch.zeros(1, 64), torch.ones(8, dtype=torch.int64))


@pytest.fixture(scope="module")
def refs(tiny_ckpt):
    eng = LLMEngine.from_pretrained(tiny_ckpt, EngineConfig(num_speculative_tokens=1, block_size=8))
    return [o.outputs[0].token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=GEN, temperature=0))]


def _lean_engine(ckpt, shards) -> tuple[LLMEngine, ReplicatedExperts]:
    backend = ReplicatedExperts(None, num_shards=len(shards), num_slots=4 * len(shards),
                                shard_factory=lambda i: shards[i])
    backend.needs_expert_weights = False
    eng = LLMEngine.from_pretrained(ckpt, EngineConfig(num_speculative_tokens=1, block_size=8), expert_backend=backend)
    return eng, backend


def _greedy(eng: LLMEngine) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in eng.generate(PROMPTS, SamplingParams(max_tokens=GEN, temperature=0))]


def test_shards_fetch_from_the_checkpoint_and_refuse_what_they_cannot(tiny_ckpt, refs, tmp_path) -> None:
    srv = [ShardServer("127.0.0.1", expert_source=CheckpointExperts(str(tiny_ckpt))) for _ in range(2)]
    bare = ShardServer("127.0.0.1")  # no checkpoint: FETCH is a protocol error
    try:
        eng, backend = _lean_engine(tiny_ckpt, [RemoteShard(s.address, f"s{i}") for i, s in enumerate(srv)])
        assert param_summary(eng.model)["routed_expert_bytes"] == 0
        assert _greedy(eng) == refs
        # every slot of the 3 MoE layers was read from the checkpoint by its shard, once: 3 x 8 slots
        assert [s.stats()["fetched_rows"] for s in srv] == [12, 12]
        assert sum(s.stats()["rows_total"] for s in srv) == int(backend.recorder.slot.sum())
        stub = AbsentExperts(8, 64, 32, torch.float32)
        with pytest.raises(ShardUnavailable):
            RemoteShard(bare.address, "bare").load("layers.1", stub, [0, 1])
        assert "FETCH field op" in bare.stats()["last_protocol_error"]
        wrong = AbsentExperts(8, 64, 16, torch.float32)  # another model's shapes
        with pytest.raises(ShardUnavailable):
            RemoteShard(srv[0].address, "wrong").load("layers.1", wrong, [0, 1])
        assert "FETCH field HELLO" in srv[0].stats()["last_protocol_error"]
    finally:
        for s in srv + [bare]:
            s.close()


@pytest.fixture()
def shard_processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_killed_shard_is_reloaded_from_the_checkpoint_mid_generation(tiny_ckpt, refs, shard_processes) -> None:
    addrs = spawn_shard_processes(3, shard_processes, secret=SECRET, checkpoint=str(tiny_ckpt))
    remote = [RemoteShard(a, f"s{i}", secret=SECRET) for i, a in enumerate(addrs)]
    eng, backend = _lean_engine(tiny_ckpt, remote)
    assert [r.fetched_slots for r in remote] == [12, 12, 12]  # 3 MoE layers x 4 slots each
    assert _greedy(eng) == refs
    # SIGKILL shard 1 while the requests are decoding (the 7th per-sequence step of 19): the forward that finds it dead
    # re-plans over 2 shards, which read the lost experts from the checkpoint; no request fails
    calls = {"n": 0}

    def kill_once(seq) -> None:
        calls["n"] += 1
        if calls["n"] == 7:
            shard_processes[1].send_signal(signal.SIGKILL)
            shard_processes[1].wait()

    eng.fault_hook = kill_once
    assert _greedy(eng) == refs and not eng.failed
    eng.fault_hook = None
    assert calls["n"] > 7 and any(e["kind"] == "shard_failed" for e in backend.events)
    assert backend.shards == [remote[0], remote[2]] and backend.placement.num_shards == 2
    got = remote[0].fetched_slots + remote[2].fetched_slots - 24
    assert got >= 12, got  # at least the dead shard's 12 slots were read again (by the survivors)
    # every shard dies: with a refill hook (Serve: wait for the registry's next member) a fresh shard takes all slots
    fresh: list[RemoteShard] = []

    def refill() -> list[RemoteShard]:
        a = spawn_shard_processes(1, shard_processes, secret=SECRET, checkpoint=str(tiny_ckpt))[0]
        fresh.append(RemoteShard(a, "fresh", secret=SECRET))
        return fresh

    backend.refill = refill
    for i in (0, 2):
        shard_processes[i].kill()
        shard_processes[i].wait()
    assert _greedy(eng) == refs and not eng.failed
    assert backend.shards == fresh and fresh[0].fetched_slots >= 3 * 8
    # without the hook an engine that holds no experts cannot run a layer: the step fails, with a clear message
    backend.refill = None
    shard_processes[-1].kill()
    shard_processes[-1].wait()
    with pytest.raises(RuntimeError, match="holds no routed-expert weights"):
        eng.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))
