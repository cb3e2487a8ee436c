"""Rank-local weights: each rank of a layout, built on meta and materialized alone, holds exactly the one-process
build's tensors (its expert rows of them), and building it allocates only its own share."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from raymoe.config import ModelConfig
from raymoe.model import DeepSeekV3
from raymoe.model.init import init_weights, param_seed
from raymoe.train import parallelize as par
from raymoe.train.sharded import expert_rows
from raymoe.train.topology import Topology

TINY = ModelConfig.preset("tiny")
SEED = 7


class _AllocCounter(TorchDispatchMode):
    """Bytes of every new (non-meta) tensor storage an aten op creates while active, and the largest one."""

    def __init__(self) -> None:
        super().__init__()
        self.total = self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {a.untyped_storage().data_ptr() for a in tree_flatten((args, kwargs))[0]
                if isinstance(a, torch.Tensor) and not a.is_meta}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta and t.untyped_storage().data_ptr() not in seen:
                n = t.untyped_storage().nbytes()
                seen.add(t.untyped_storage().data_ptr())
                self.total += n
                self.largest = max(self.largest, n)
        return out


@pytest.fixture(scope="module")
def full() -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in par.build_model(TINY, SEED).named_parameters()}


LAYOUTS = [  # (pp, ep, dp, schedule, num_microbatches)
    (2, 1, 1, "1f1b", 2),
    (1, 2, 1, "1f1b", 1),
    (1, 4, 1, "1f1b", 1),
    (2, 2, 1, "1f1b", 2),
    (2, 2, 2, "zb1p", 2),
    (2, 1, 1, "dualpipe", 4),
    (2, 2, 1, "dualpipe", 4),
    (2, 1, 1, "dualpipev", 4),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: "pp{}_ep{}_dp{}_{}".format(*l[:4]))
def test_every_rank_materializes_the_one_process_weights_and_only_its_share(layout, full) -> None:
    topo = Topology(*layout, TINY)
    full_bytes = sum(t.nbytes for t in full.values())
    covered: dict[str, set[int]] = {}
    for r in range(topo.world_size):
        with _AllocCounter() as alloc:
            m = par.build_model(TINY, SEED, device="meta")
            par.apply_pp(m, topo, r)
            par.apply_ep(m, topo, r, None)
            par.materialize(m, SEED)
        rows = expert_rows(m)
        params = dict(m.named_parameters())
        assert set(params) == set(topo.param_names(topo.coords(r).pp_rank))
        for n, p in params.items():
            assert p.device.type == "cpu"
            lo, hi, _ = rows.get(n, (0, full[n].shape[0], None))
            assert torch.equal(p.detach(), full[n][lo:hi]), (layout, r, n)
            covered.setdefault(n, set()).update(range(lo, hi))
        assert all(not b.is_meta for b in m.buffers())
        assert torch.equal(m.rotary.inv_freq, DeepSeekV3(TINY, seed=0).rotary.inv_freq)
        # memory: the parameters this rank holds, plus a few small buffers (RoPE frequencies, router biases)
        share = sum(p.nbytes for p in params.values())
        buffers = sum(b.nbytes for b in m.buffers())
        assert share <= alloc.total <= share + buffers + 4096, (layout, r, alloc.total, share)
        assert alloc.largest <= max(p.nbytes for p in params.values())
        if topo.ep > 1 or set(params) != set(full):  # a rank that holds less than the model allocated less
            assert alloc.total < full_bytes - 4096, (layout, r)
    # together the ranks hold every row of every tensor
    assert {n: set(range(t.shape[0])) for n, t in full.items()} == covered


def test_one_process_build_is_a_function_of_seed_and_name() -> None:
    a = par.build_model(TINY, SEED)
    torch.manual_seed(123)  # the global generator's state does not matter
    torch.randn(10)
    b = par.build_model(TINY, SEED)
    c = par.build_model(TINY, SEED + 1)
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert all(not torch.equal(pa[n], pc[n]) for n in pa if not n.endswith("norm.weight") and "layernorm" not in n)
    # the recipe: N(0, initializer_range) for matrices, ones for norms, zero router bias; one stream per name/row
    std = TINY.initializer_range
    w = pa["layers.0.self_attn.q_a_proj.weight"]
    g = torch.Generator().manual_seed(param_seed(SEED, "layers.0.self_attn.q_a_proj.weight"))
    assert torch.equal(w, torch.empty(w.shape).normal_(0, std, generator=g))
    e = pa["layers.1.mlp.experts.down_proj"]
    g = torch.Generator().manual_seed(param_seed(SEED, "layers.1.mlp.experts.down_proj/5"))
    assert torch.equal(e[5], torch.empty(e.shape[1:]).normal_(0, std, generator=g))
    assert torch.equal(pa["norm.weight"], torch.ones(TINY.hidden_size))
    assert all(torch.equal(r.expert_bias, torch.zeros(TINY.n_routed_experts)) for r in a.routers())
    # distinct names, distinct streams (no two matrices alike)
    mats = [p for n, p in pa.items() if p.dim() >= 2]
    assert len({float(p.detach().flatten()[0]) for p in mats}) == len(mats)


def test_global_seed_still_fixes_a_plain_build() -> None:
    torch.manual_seed(3)
    a = DeepSeekV3(TINY)
    torch.manual_seed(3)
    b = DeepSeekV3(TINY)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_bf16_materialize_gets_the_fp32_values_rounded() -> None:
    m = DeepSeekV3(TINY, device="meta").to(torch.bfloat16)
    init_weights(m, SEED)
    ref = par.build_model(TINY, SEED)
    for (n, p), (_, q) in zip(m.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q.to(torch.bfloat16)), n


def _rchar() -> int:
    """Bytes this process has read through read()/pread() system calls (the kernel's count, /proc/self/io)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def test_a_rank_loads_its_slices_of_a_checkpoint_and_reads_only_those_bytes(tmp_path) -> None:
    """A checkpoint saved by one process (one file with every tensor) loaded by each rank of pp=2 × ep=2: the rank's
    weights and AdamW state equal the matching tensors / expert rows of the full ones, and the bytes read — counted
    by the reader and by the kernel — are the rank's share plus the file's header, not the file."""
    from raymoe.optim import GuardedAdamW
    from raymoe.train import sharded

    ref = par.build_model(TINY, SEED)
    opt = GuardedAdamW(ref.parameters(), lr=1e-2)
    x = torch.randint(0, TINY.vocab_size, (2, 16))
    ref(x, labels=x).loss.backward()
    opt.step()
    sharded.save_rank(ref, opt, Topology(1, 1, 1, "1f1b", 1, TINY), 0, tmp_path)
    (f,) = (tmp_path / "shards").glob("*.safetensors")
    file_bytes = f.stat().st_size
    full = dict(ref.named_parameters())
    topo = Topology(2, 2, 1, "1f1b", 2, TINY)
    header = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    for r in [0] + list(range(topo.world_size)):  # rank 0 twice: the first load warms up imports and caches
        m = par.build_model(TINY, SEED + 1, device="meta")
        par.apply_pp(m, topo, r)
        par.apply_ep(m, topo, r, None)
        par.materialize(m, SEED + 1)
        mopt = GuardedAdamW(m.parameters(), lr=1e-2)
        before = _rchar()
        idx_reads: list[int] = []
        real_close = sharded.ShardIndex.close

        def close(self, _real=real_close) -> None:
            idx_reads.append(self.bytes_read)
            _real(self)

        sharded.ShardIndex.close = close
        try:
            sharded.load_rank(m, mopt, topo, r, tmp_path)
        finally:
            sharded.ShardIndex.close = real_close
        kernel = _rchar() - before
        rows = expert_rows(m)
        share = 0
        for n, p in m.named_parameters():
            lo, hi, _ = rows.get(n, (0, full[n].shape[0], None))
            assert torch.equal(p.detach(), full[n].detach()[lo:hi]), (r, n)
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(mopt.state[p][k], opt.state[full[n]][k][lo:hi]), (r, n, k)
            assert torch.equal(mopt.state[p]["step"], opt.state[full[n]]["step"])
            share += 3 * p.nbytes + 4  # weights, two moments, the fp32 step count
        assert idx_reads == [share + header], (r, idx_reads, share + header)
        assert share + header <= kernel <= share + header + (64 << 10), (r, kernel, share + header)
        assert kernel < 0.75 * file_bytes, (r, kernel, file_bytes)


def test_slice_reader_matches_safetensors_and_refuses_malformed_headers(tmp_path) -> None:
    import json
    import struct

    from safetensors.torch import load_file, save_file

    from raymoe.safetensors_slices import SafetensorsError, SliceReader

    ts = {"a": torch.randn(6, 3, 2), "b": torch.arange(5, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
          "s": torch.tensor(2.5), "z": torch.zeros(0, 3)}
    save_file(ts, str(tmp_path / "x.safetensors"), metadata={"k": "v"})
    ref = load_file(str(tmp_path / "x.safetensors"))
    with SliceReader.open(tmp_path / "x.safetensors") as r:
        assert r.metadata == {"k": "v"} and sorted(r.keys()) == sorted(ts)
        for k in ts:
            assert torch.equal(r.get(k), ref[k]) and r.get(k).dtype == ref[k].dtype
        before = r.bytes_read
        assert torch.equal(r.get("a", (2, 5)), ref["a"][2:5]) and r.bytes_read - before == 3 * 3 * 2 * 4
        assert r.get("a", (4, 4)).shape == (0, 3, 2)
        with pytest.raises(ValueError, match="out of range"):
            r.get("a", (5, 7))
        with pytest.raises(ValueError, match="scalar"):
            r.get("s", (0, 1))

    def write(header: dict, data: bytes = b"\0" * 64) -> str:
        h = json.dumps(header).encode()
        path = tmp_path / "bad.safetensors"
        path.write_bytes(struct.pack("<Q", len(h)) + h + data)
        return str(path)

    for header, needle in [
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, "spans 8 bytes"),
        ({"t": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'PICKLE'"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "not a list of sizes"),
        ({"t": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, "past the end"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
        ({"__metadata__": {"k": 1}}, "strings to strings"),
    ]:
        with pytest.raises(SafetensorsError, match=needle):
            SliceReader.open(write(header))
    (tmp_path / "short.safetensors").write_bytes(b"\1\2")
    with pytest.raises(SafetensorsError, match="too short"):
        SliceReader.open(tmp_path / "short.safetensors")


def test_router_rows_are_names_that_survive_pruning() -> None:
    """Routing rows are keyed by full-model module name: after pruning, a dropped router's object id may belong to a
    new module (an expert shard, a materialized tensor's owner), a name cannot."""
    m = par.build_model(TINY, SEED, device="meta")
    rows = par.router_rows(m)
    assert rows == {"layers.1.mlp.router": 0, "layers.2.mlp.router": 1, "mtp.0.block.mlp.router": 2}
    topo = Topology(2, 2, 1, "1f1b", 2, TINY)
    for r in range(topo.world_size):
        m = par.build_model(TINY, SEED, device="meta")
        rows = par.router_rows(m)
        par.apply_pp(m, topo, r)
        par.apply_ep(m, topo, r, None)
        par.materialize(m, SEED)
        held = {n: rows[n] for n, mod in m.named_modules() if n in rows}
        assert all(type(mod).__name__ == "Router" for n, mod in m.named_modules() if n in rows)
        assert sorted(held.values()) == ([0] if topo.coords(r).pp_rank == 0 else [1, 2])
