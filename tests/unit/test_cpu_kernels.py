"""raymoe.model.cpu_kernels against torch: every vector path (AVX-512, AVX2, SSE builds), every row path (register
tiles, row kernels, tails), the routed-expert kernel and its hand-back of large experts, and the engine with the
kernels on, off and unavailable."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from raymoe.model import cpu_kernels as ck
from raymoe.model.moe import RoutedExperts

HAVE_CC = bool(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc"))
pytestmark = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this host: the kernels cannot be built")


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 sums in another order: relative to the magnitude of the terms, not of the (possibly cancelling) result
    assert got.shape == ref.shape
    if ref.numel() == 0:
        return
    scale = ref.abs().max().clamp_min(1.0)
    assert (got - ref).abs().max() <= 2e-5 * scale, (got - ref).abs().max()


def test_kernels_build_here():
    assert ck.available(), ck.why_unavailable()
    assert ck.vector_width() in (4, 8, 16)


@pytest.mark.parametrize("K", [512, 96, 100, 7])
def test_linear_matches_f_linear_at_every_row_count(K):
    g = torch.Generator().manual_seed(K)
    for N in (1, 5, 64, 70):
        w = torch.randn(N, K, generator=g)
        for M in range(1, 21):
            x = torch.randn(M, K, generator=g)
            y = ck.linear(x, w, max_rows=64)
            assert y is not None and y.shape == (M, N)
            _close(y, F.linear(x, w))


def test_linear_keeps_leading_dims_and_strided_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g)
    x = torch.randn(3, 1, 64, generator=g)
    y = ck.linear(x, w, max_rows=16)
    assert y.shape == (3, 1, 48)
    _close(y, F.linear(x, w))
    big = torch.randn(5, 128, generator=g)
    xs = big[:, 32:96]  # rows 128 floats apart
    _close(ck.linear(xs, w, max_rows=16), F.linear(xs, w))
    xt = torch.randn(64, 5, generator=g).t()  # not row-contiguous: copied first
    _close(ck.linear(xt, w, max_rows=16), F.linear(xt, w))


def test_linear_declines_what_it_does_not_run():
    w = torch.randn(8, 16)
    assert ck.linear(torch.randn(ck.ROW_LIMIT + 1, 16), w) is None  # the BLAS is faster there
    assert ck.linear(torch.randn(2, 16, dtype=torch.bfloat16), w.bfloat16()) is None
    assert ck.linear(torch.randn(2, 16), torch.randn(16, 8).t()) is None  # weight not contiguous [N, K]
    assert ck.linear(torch.randn(2, 16), torch.randn(8, 15)) is None
    assert ck.linear(torch.randn(0, 16), w) is None


def test_row_limit_follows_thread_count():
    """Threaded kernels (an OpenMP build, as here) take every few-row product at any thread count; a
    single-threaded build leaves the compute-bound ones to the parallel BLAS under several threads (a subprocess
    builds one, with $RAYMOE_KERNEL_OPENMP=0)."""
    assert ck.threaded()
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert ck.row_limit() == ck.ROW_LIMIT and ck.row_limit(experts=True) == ck.EXPERT_ROW_LIMIT
    finally:
        torch.set_num_threads(n)


def test_single_threaded_build_when_asked(tmp_path):
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from raymoe.model import cpu_kernels as ck
        assert ck.available() and not ck.threaded()
        torch.set_num_threads(2)
        assert ck.row_limit() == ck.row_limit(experts=True) == ck.MEMORY_BOUND_ROWS
        torch.set_num_threads(1)
        assert ck.row_limit() == ck.ROW_LIMIT
        w, x = torch.randn(70, 64), torch.randn(5, 64)
        assert (ck.linear_packed(x, ck.pack(w)) - F.linear(x, w)).abs().max().item() < 1e-4
        print("ok")
    """)
    env = dict(os.environ, RAYMOE_KERNEL_OPENMP="0", RAYMOE_KERNEL_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok" in r.stdout
    so = list(pathlib.Path(tmp_path).glob("raymoe_cpu_kernels-*.so"))
    assert len(so) == 1 and "libgomp" not in subprocess.run(["readelf", "-d", str(so[0])], capture_output=True,
                                                            text=True).stdout


def test_threads_split_the_work_not_the_sums():
    """Under 2 or 3 threads each output is still computed by one thread in the same order: results equal the
    single-threaded ones bit for bit (the split is over panels, experts, rows and heads)."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 96, generator=g)
    pw = ck.pack(w)
    xs = [torch.randn(M, 96, generator=g) for M in range(1, 18)]
    E, D, I, T, K = 9, 64, 32, 16, 4  # noqa: E741
    w_gu, w_dn = torch.randn(E, 2 * I, D, generator=g) / 8, torch.randn(E, D, I, generator=g) / 6
    xt = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])
    idx[idx >= 5] += 1  # expert 5: chosen by no token
    tw = torch.rand(T, K, generator=g)
    counts = torch.bincount(idx.flatten(), minlength=E)
    xe = torch.randn(int(counts.sum()), D, generator=g)
    N, H, Dn, R, C, V, S = 7, 4, 16, 8, 32, 16, 40
    buf, slots, _ = _paged(N, S, C + R, bs=8, seed=2)
    lens = torch.randint(1, S + 1, (N,), generator=g)
    q_nope, q_pe = torch.randn(N, H, Dn, generator=g), torch.randn(N, H, R, generator=g)
    wk = torch.randn(H, Dn + V, C, generator=g) / 4

    def run():
        return ([ck.linear_packed(x, pw, max_rows=64) for x in xs]
                + [ck.experts(xe, counts, w_gu, w_dn, max_rows=8)[0], ck.moe_routed(xt, idx, tw, counts, w_gu, w_dn,
                                                                                      max_rows=64),
                   ck.mla_decode_absorbed(q_nope, q_pe, wk[:, :Dn].transpose(1, 2).contiguous(), wk[:, Dn:], buf,
                                          slots, lens, 0.3)])

    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ref = run()
        for threads in (2, 3):
            torch.set_num_threads(threads)
            got = run()
            for i, (a, b) in enumerate(zip(got, ref)):
                if i == len(xs):  # experts over max_rows were left to the caller: uninitialised rows
                    keep = torch.repeat_interleave(counts <= 8, counts)
                    a, b = a[keep], b[keep]
                assert torch.equal(a, b), (threads, i)
    finally:
        torch.set_num_threads(n)


def _reference_experts(x, counts, w_gu, w_dn):
    I = w_dn.shape[2]  # noqa: E741
    out, row = [], 0
    for e, c in enumerate(counts):
        xe = x[row : row + c]
        gu = xe @ w_gu[e].t()
        out.append((F.silu(gu[:, :I]) * gu[:, I:]) @ w_dn[e].t())
        row += c
    return torch.cat(out)


def test_experts_kernel_matches_torch_and_hands_back_large_experts():
    g = torch.Generator().manual_seed(1)
    E, D, I = 6, 64, 40  # noqa: E741
    w_gu, w_dn = torch.randn(E, 2 * I, D, generator=g) / 8, torch.randn(E, D, I, generator=g) / 6
    counts = [2, 0, 1, 20, 3, 0]
    x = torch.randn(sum(counts), D, generator=g)
    y, todo = ck.experts(x, torch.tensor(counts), w_gu, w_dn, max_rows=16)
    assert todo == [3]  # 20 rows > 16: the caller's
    ref = _reference_experts(x, counts, w_gu, w_dn)
    keep = torch.ones(x.shape[0], dtype=torch.bool)
    keep[3:23] = False
    _close(y[keep], ref[keep])
    y, todo = ck.experts(x, torch.tensor(counts), w_gu, w_dn, max_rows=64)
    assert todo == []
    _close(y, ref)
    with pytest.raises(ValueError, match="do not add up"):
        ck.experts(x[:-1], torch.tensor(counts), w_gu, w_dn)


@pytest.mark.parametrize("rows_per_expert", [[1, 0, 2, 1], [0, 0, 0, 0], [3, 17, 0, 5]])
def test_routed_experts_native_equals_torch_path(rows_per_expert):
    torch.manual_seed(0)
    ref = RoutedExperts(4, 32, 24)
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.2)
    nat = RoutedExperts(4, 32, 24)
    nat.load_state_dict(ref.state_dict())
    ref.fuse_gate_up()
    nat.fuse_gate_up(native=True)
    assert nat.fused and nat.native and nat._down_is_nk() and not ref._down_is_nk()
    _close(nat.down_proj.detach(), ref.down_proj.detach())  # same values, other layout
    counts = torch.tensor(rows_per_expert)
    x = torch.randn(int(counts.sum()), 32)
    with torch.no_grad():
        _close(nat.forward_grouped(x, counts), ref.forward_grouped(x, counts))
    shard = nat.shard([2, 0])
    assert shard.native and shard._down_is_nk()
    c2 = torch.tensor([rows_per_expert[2], rows_per_expert[0]])
    x2 = torch.randn(int(c2.sum()), 32)
    with torch.no_grad():
        _close(shard.forward_grouped(x2, c2), ref.shard([2, 0]).forward_grouped(x2, c2))


@pytest.mark.parametrize("T,E,n_group,topk_group,k", [(16, 32, 4, 2, 4), (5, 64, 8, 3, 6), (3, 16, 1, 1, 2),
                                                        (7, 256, 8, 4, 8), (4, 12, 3, 3, 5)])
def test_route_chooses_what_torch_route_chooses(T, E, n_group, topk_group, k):
    from raymoe.model.moe import route

    g = torch.Generator().manual_seed(E + k)
    logits, bias = torch.randn(T, E, generator=g), torch.randn(E, generator=g) * 0.1
    ref = route(logits, bias, n_group, topk_group, k, 2.5, True)
    idx, w, counts = ck.route(logits.sigmoid(), bias, n_group, topk_group, k, 2.5, True)
    a, b = ref.topk_idx.sort(-1), idx.sort(-1)
    assert torch.equal(a.values, b.values)  # the same experts for every token
    torch.testing.assert_close(w.gather(1, b.indices), ref.topk_weight.gather(1, a.indices), rtol=1e-6, atol=1e-7)
    assert torch.equal(counts, ref.counts)
    _, w_raw, _ = ck.route(logits.sigmoid(), bias, n_group, topk_group, k, 1.0, False)  # unnormalised gates
    torch.testing.assert_close(w_raw, logits.sigmoid().gather(1, idx))


def test_route_breaks_ties_by_lower_expert_id_and_refuses_bad_shapes():
    scores = torch.full((1, 8), 0.5)
    idx, _, _ = ck.route(scores, torch.zeros(8), 1, 1, 3, 1.0, True)
    assert idx.tolist() == [[0, 1, 2]]
    assert ck.route(torch.rand(2, 10), torch.zeros(10), 4, 2, 2, 1.0, True) is None  # 10 experts, 4 groups
    assert ck.route(torch.rand(2, 8), torch.zeros(8), 4, 1, 3, 1.0, True) is None  # 3 > the 2 experts kept


def test_moe_routed_is_the_weighted_sum_of_each_tokens_experts():
    g = torch.Generator().manual_seed(3)
    E, D, I, T, K = 8, 64, 32, 6, 3  # noqa: E741
    w_gu, w_dn = torch.randn(E, 2 * I, D, generator=g) / 8, torch.randn(E, D, I, generator=g) / 6
    x = torch.randn(T, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    counts = torch.bincount(idx.flatten(), minlength=E)
    ref = torch.zeros(T, D)
    for t in range(T):
        for j in range(K):
            e = idx[t, j]
            gu = w_gu[e] @ x[t]
            ref[t] += w[t, j] * (w_dn[e] @ (F.silu(gu[:I]) * gu[I:]))
    _close(ck.moe_routed(x, idx, w, counts, w_gu, w_dn, max_rows=64), ref)
    assert ck.moe_routed(x, idx, w, counts, w_gu, w_dn, max_rows=int(counts.max()) - 1) is None  # the BLAS's
    with pytest.raises(ValueError, match="add up to"):
        ck.moe_routed(x, idx, w, counts * 2, w_gu, w_dn, max_rows=64)
    bad = idx.clone()
    bad[0, 0] = E
    with pytest.raises(ValueError, match="expert ids must be in 0..7"):
        ck.moe_routed(x, bad, w, counts, w_gu, w_dn, max_rows=64)


@pytest.mark.parametrize("N,K", [(5, 7), (37, 100), (64, 512), (33, 64)])
def test_packed_linear_matches_f_linear(N, K):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g)
    pw = ck.pack(w)
    nr = ck.panel_width()
    assert pw.panels.shape == (-(-N // nr), K, nr) and (pw.N, pw.K) == (N, K)
    for M in range(1, 18):
        x = torch.randn(M, K, generator=g)
        _close(ck.linear_packed(x, pw, max_rows=64), F.linear(x, w))
    assert ck.linear_packed(torch.randn(ck.ROW_LIMIT + 1, K), pw) is None
    assert ck.linear_packed(torch.randn(2, K + 1), pw) is None


@pytest.mark.parametrize("D", [512, 192, 7, 130])
def test_rms_norm_matches_the_torch_norm(D):
    from raymoe.model.layers import _rms_norm

    g = torch.Generator().manual_seed(D)
    x, w = torch.randn(3, 5, D, generator=g) * 3, torch.randn(D, generator=g)
    _close(ck.rms_norm(x, w, 1e-6), _rms_norm(x, w, 1e-6)[0])
    xs = torch.randn(4, 2 * D, generator=g)[:, :D]  # strided rows
    _close(ck.rms_norm(xs, w, 1e-6), _rms_norm(xs, w, 1e-6)[0])


def test_rope_matches_apply_rope_for_decode_rows():
    from raymoe.model.rope import apply_rope

    g = torch.Generator().manual_seed(5)
    cos, sin = torch.randn(5, 1, 16, generator=g), torch.randn(5, 1, 16, generator=g)
    q_pe = torch.randn(5, 1, 8, 96, generator=g)[..., 64:]  # a strided slice, as MLA's split gives
    _close(ck.rope(q_pe, cos, sin), apply_rope(q_pe, cos, sin))
    k_pe = torch.randn(5, 1, 160, generator=g)[..., 128:].unsqueeze(2)
    _close(ck.rope(k_pe, cos, sin), apply_rope(k_pe, cos, sin))
    assert ck.rope(torch.randn(2, 3, 8, 32), torch.randn(3, 16), torch.randn(3, 16)) is None  # prefill: torch's


def _paged(N, S, Dk, bs=16, seed=0):
    """A cache of random latents and each row's slots: whole blocks in a shuffled order (runs of ``bs`` rows)."""
    g = torch.Generator().manual_seed(seed)
    nb = N * (-(-S // bs))
    buf = torch.randn(nb * bs, Dk, generator=g)
    table = torch.randperm(nb, generator=g).view(N, -1)
    p = torch.arange(S)
    return buf, (table[:, p // bs] * bs + p % bs).contiguous(), g


def test_mla_decode_equals_softmax_attention_over_each_rows_own_keys():
    N, H, C, R, S = 5, 8, 128, 32, 70
    buf, slots, g = _paged(N, S, C + R)
    slots[1] = torch.randint(0, buf.shape[0], (S,), generator=g)  # scattered slots: runs of one
    lens = torch.tensor([70, 1, 33, 69, 16])
    q = torch.randn(N, H, C + R, generator=g)
    out = ck.mla_decode(q, buf, slots, lens, 0.1, C)
    for i in range(N):
        k = buf[slots[i, : lens[i]]]
        _close(out[i], torch.softmax(0.1 * (q[i] @ k.T), -1) @ k[:, :C])
    with pytest.raises(ValueError, match="every row must see 1..70 keys"):
        ck.mla_decode(q, buf, slots, torch.tensor([70, 0, 3, 3, 3]), 0.1, C)


def test_mla_decode_absorbed_equals_the_einsum_path():
    N, H, Dn, R, C, V, S = 6, 4, 16, 8, 32, 16, 40
    buf, slots, g = _paged(N, S, C + R, bs=8, seed=1)
    lens = torch.randint(1, S + 1, (N,), generator=g)
    q_nope, q_pe = torch.randn(N, H, Dn, generator=g), torch.randn(N, H, R, generator=g)
    w = torch.randn(H, Dn + V, C, generator=g) / 4  # kv_b_proj's weight as [H, N+V, C]
    w_uk, w_uv = w[:, :Dn], w[:, Dn:]
    out = ck.mla_decode_absorbed(q_nope, q_pe, w_uk.transpose(1, 2).contiguous(), w_uv, buf, slots, lens, 0.3)
    q_abs = torch.cat([torch.einsum("bhn,hnc->bhc", q_nope, w_uk), q_pe], dim=-1)
    for i in range(N):
        k = buf[slots[i, : lens[i]]]
        o_lat = torch.softmax(0.3 * torch.einsum("hd,sd->hs", q_abs[i], k), -1) @ k[:, :C]
        _close(out[i], torch.einsum("hc,hvc->hv", o_lat, w_uv))


_CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from raymoe.model import cpu_kernels as ck
    assert ck.available(), ck.why_unavailable()
    print("width", ck.vector_width())
    g = torch.Generator().manual_seed(0)
    for K in (512, 100, 24):
        w = torch.randn(37, K, generator=g)
        for M in (1, 2, 3, 4, 7, 8, 9, 16):
            x = torch.randn(M, K, generator=g)
            err = (ck.linear(x, w, max_rows=64) - F.linear(x, w)).abs().max().item()
            assert err < 1e-4, (K, M, err)
    E, D, I = 3, 48, 32
    w_gu, w_dn = torch.randn(E, 2 * I, D, generator=g) / 8, torch.randn(E, D, I, generator=g) / 6
    counts = [2, 9, 0]
    x = torch.randn(11, D, generator=g)
    y, todo = ck.experts(x, torch.tensor(counts), w_gu, w_dn, max_rows=16)
    ref = []
    for e, (a, b) in enumerate([(0, 2), (2, 11)]):
        gu = x[a:b] @ w_gu[e].t()
        ref.append((F.silu(gu[:, :I]) * gu[:, I:]) @ w_dn[e].t())
    assert todo == [] and (y - torch.cat(ref)).abs().max().item() < 1e-4
    w = torch.randn(45, 100, generator=g)
    pw = ck.pack(w)
    for M in (1, 3, 8, 9, 16):
        x = torch.randn(M, 100, generator=g)
        assert (ck.linear_packed(x, pw, max_rows=64) - F.linear(x, w)).abs().max().item() < 1e-4
    x, nw = torch.randn(3, 130, generator=g), torch.randn(130, generator=g)
    ref = nw * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert (ck.rms_norm(x, nw, 1e-6) - ref).abs().max().item() < 1e-5
    buf, q = torch.randn(64, 40, generator=g), torch.randn(3, 4, 40, generator=g)
    slots, lens = torch.arange(64).view(1, 64).repeat(3, 1), torch.tensor([64, 5, 17])
    out = ck.mla_decode(q, buf, slots, lens, 0.2, 24)
    for i in range(3):
        k = buf[: lens[i]]
        assert (out[i] - torch.softmax(0.2 * q[i] @ k.T, -1) @ k[:, :24]).abs().max().item() < 1e-5
    print("ok")
""")


@pytest.mark.parametrize("march,width", [("x86-64-v3", 8), ("x86-64-v2", 4)])
def test_other_vector_paths_match_torch(march, width, tmp_path):
    """The AVX2 and SSE builds (what AVX2-only and older hosts compile) give the same values as torch."""
    env = dict(os.environ, RAYMOE_KERNEL_MARCH=march, RAYMOE_KERNEL_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"width {width}" in r.stdout and "ok" in r.stdout
    assert len(list(pathlib.Path(tmp_path).glob("raymoe_cpu_kernels-*.so"))) == 1  # built once, cached


def test_unavailable_compiler_is_reported_and_torch_path_kept(tmp_path):
    code = textwrap.dedent("""
        import torch
        from raymoe.model import cpu_kernels as ck
        assert not ck.available()
        print("why:", ck.why_unavailable())
        assert ck.linear(torch.randn(2, 8), torch.randn(4, 8)) is None
    """)
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), RAYMOE_KERNEL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "why: " in r.stdout and "no-such-cc" in r.stdout


@pytest.mark.usefixtures("one_torch_thread")  # the row limit of one intra-op thread
def test_native_linears_pack_on_first_few_row_product_and_follow_weight_changes():
    from raymoe.model.layers import RMSNorm, use_native_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), RMSNorm(48))
    ref = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False), RMSNorm(48))
    ref.load_state_dict(net.state_dict())
    assert use_native_linears(net) == 1 and net[1].native
    lin = net[0]
    with torch.no_grad():
        big = torch.randn(ck.ROW_LIMIT + 4, 32)
        _close(net(big), ref(big))  # many rows: F.linear, nothing packed
        assert "_native_pack" not in lin.__dict__
        x = torch.randn(3, 32)
        _close(net(x), ref(x))
        first = lin._native_pack["packed"]
        net(x)
        assert lin._native_pack["packed"] is first  # kept while the weight is unchanged
        lin.weight.mul_(2.0)  # an in-place update (as a weight reload would do): repacked
        ref[0].weight.mul_(2.0)
        _close(net(x), ref(x))
        assert lin._native_pack["packed"] is not first
    y = net(x)  # autograd on: the torch path, gradients flow
    y.sum().backward()
    assert lin.weight.grad is not None


def test_dense_swiglu_and_router_gate_run_natively_on_the_shared_packed_copies(monkeypatch):
    """A serving SwiGLU (shared expert, dense FFN) runs as one swiglu_packed call on the packed copies its linears
    keep anyway, and the router's gate product through a packed copy; both equal the torch modules, and a
    weight update is followed."""
    from raymoe.config import ModelConfig
    from raymoe.model.layers import SwiGLU, enable_fused_weight_cache, use_native_linears
    from raymoe.model.moe import Router

    torch.manual_seed(0)
    ffn, ref = SwiGLU(48, 40), SwiGLU(48, 40)
    ref.load_state_dict(ffn.state_dict())
    enable_fused_weight_cache(ffn, native=True)
    use_native_linears(ffn)
    assert ffn.native
    calls = []
    native = ck.swiglu_packed
    monkeypatch.setattr(ck, "swiglu_packed", lambda *a: calls.append(1) or native(*a))
    with torch.no_grad():
        for M in (1, 5, 16):
            x = torch.randn(M, 1, 48)
            _close(ffn(x), ref(x))
        assert len(calls) == 3
        big = torch.randn(ck.ROW_LIMIT + 1, 48)
        _close(ffn(big), ref(big))  # many rows: torch's GEMMs
        assert len(calls) == 3
        for m in (ffn, ref):
            m.up_proj.weight.mul_(-2.0)
        x = torch.randn(4, 48)
        _close(ffn(x), ref(x))  # repacked after the in-place update
    cfg = ModelConfig.preset("tiny")
    router, rref = Router(cfg), Router(cfg)
    torch.nn.init.normal_(router.weight)
    rref.load_state_dict(router.state_dict())
    router.native = True
    with torch.no_grad():
        x = torch.randn(6, cfg.hidden_size)
        got, want = router(x), rref(x)
        _close(got.scores, want.scores)
        assert torch.equal(got.topk_idx.sort(-1).values, want.topk_idx.sort(-1).values)
        assert router.__dict__["_packed_gate"] is not None


def test_mla_decode_layer_equals_the_modules_decode_forward(monkeypatch, tiny_mla_paged):
    """One MLA layer over a decode view (three sequences, one with a 3-token draft): the one-call native layer gives
    the torch path's outputs and writes the same latents into the cache, on 1 and 2 threads (bit-equal to each
    other)."""
    from raymoe.model.layers import enable_fused_weight_cache, use_native_linears

    m, mla, c, tables = tiny_mla_paged
    clean = c.buf.clone()
    v = c.decode_batch([(tables[0], 5, 1), (tables[1], 8, 3), (tables[2], 2, 1)])
    cos, sin = m.rotary(v.positions(1, "cpu"))
    x = torch.randn(5, 1, m.config.hidden_size)
    with torch.no_grad():
        ref = mla(x, cos, sin, v)
    ref_buf = c.buf.clone()
    calls = []
    native = ck.mla_decode_layer
    monkeypatch.setattr(ck, "mla_decode_layer", lambda *a: calls.append(1) or native(*a))
    enable_fused_weight_cache(mla, native=True)
    use_native_linears(mla)
    c.cpu_kernels = mla.native = True
    outs = []
    n = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            c.buf.copy_(clean)
            with torch.no_grad():
                outs.append(mla(x, cos, sin, v))
            _close(c.buf, ref_buf)
    finally:
        torch.set_num_threads(n)
    assert len(calls) == 2
    _close(outs[0], ref)
    assert torch.equal(outs[0], outs[1])


def test_moe_layer_is_router_experts_and_shared_expert_in_one_call():
    """rm_moe_layer against the modules: the router's scores and expert choice (torch's route), the weighted routed
    experts and the shared SwiGLU; an expert over max_rows hands back the routing only; 2 threads bit-equal to 1."""
    from raymoe.config import ModelConfig
    from raymoe.model.layers import SwiGLU
    from raymoe.model.moe import Router, route

    cfg = ModelConfig.preset("tiny")
    g = torch.Generator().manual_seed(5)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, generator=g)
    router.expert_bias.normal_(generator=g)
    E, D, I = cfg.n_routed_experts, cfg.hidden_size, 24  # noqa: E741
    w_gu, w_dn = torch.randn(E, 2 * I, D, generator=g) / 8, torch.randn(E, D, I, generator=g) / 6
    shared = SwiGLU(D, 40)
    T = 12
    x = torch.randn(T, D, generator=g)
    packed_shared = (ck.pack(torch.cat([shared.gate_proj.weight, shared.up_proj.weight])),
                     ck.pack(shared.down_proj.weight))
    args = (ck.pack(router.weight), router.expert_bias, router.n_group, router.topk_group, router.top_k,
            router.route_scale, router.norm_topk_prob, w_gu, w_dn)
    with torch.no_grad():
        ref_r = route(F.linear(x, router.weight), router.expert_bias, router.n_group, router.topk_group,
                      router.top_k, router.route_scale, router.norm_topk_prob)
        ref = ck.moe_routed(x, ref_r.topk_idx, ref_r.topk_weight, ref_r.counts, w_gu, w_dn, max_rows=64) + shared(x)
        n = torch.get_num_threads()
        outs = []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(ck.moe_layer(x, *args, packed_shared, max_rows=64))
        finally:
            torch.set_num_threads(n)
        y, idx, tw, scores, counts = outs[0]
        _close(scores, ref_r.scores)
        assert torch.equal(idx.sort(-1).values, ref_r.topk_idx.sort(-1).values) and torch.equal(counts, ref_r.counts)
        _close(y, ref)
        assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
        no_shared = ck.moe_layer(x, *args, None, max_rows=64)[0]
        _close(no_shared, ref - shared(x))
        over = ck.moe_layer(x, *args, packed_shared, max_rows=int(ref_r.counts.max()) - 1)
        assert over[0] is None and torch.equal(over[4], ref_r.counts)  # the routing, not the experts
