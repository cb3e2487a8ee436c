"""`python -m raymoe.jobs.bench zero`: AdamW state per rank under native ZeRO-1 against replicated native DP.

For each layout (``layouts=ep1dp2,ep2dp2,ep1dp4``: pp1 × ep × dp, one process per rank over gloo, no Ray) every
rank builds its shard of the model (``model=tiny`` or ``small``; the ``parallelize`` steps the workers use) twice,
trains both copies the same ``steps`` steps on the same synthetic batches — one under
:class:`~raymoe.train.parallelize.NativeDataParallel` (``zero_stage=0``), one under
:class:`~raymoe.train.zero.ZeroDataParallel` (``zero_stage=1``) — and reports per rank:

* the bytes of AdamW moments each optimizer holds (``exp_avg`` + ``exp_avg_sq``), and their ratio;
* the plan's figure for the same layout (:func:`raymoe.plan.plan_training`, precision ``fp32``: both moments fp32)
  for ZeRO-1 and unsharded — the bench raises if the runtime's ZeRO-1 bytes differ from the plan's by more than the
  bucket padding (fewer than ``ep·dp`` elements per bucket), or its replicated bytes differ at all;
* the largest distance between the two runs' weights after the last step, per tensor, relative to how far training
  moved that tensor (fp32 reduction order; the bench raises above 1e-3), and the largest relative difference of the
  global gradient norms (raises above 1e-5).

The rank function :func:`train_rank` is also what tests/unit/test_zero_sharding.py runs.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import tempfile
from typing import Any, Optional

import torch

__all__ = ["train_rank", "spawn", "run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(cfg: Any, topo: Any, rank: int, groups: Any, zero: bool, lr: float, wd: float, clip: float,
           bucket: int) -> tuple[Any, Any]:
    from raymoe.optim import GuardedAdamW, param_groups
    from raymoe.train import parallelize as par

    model = par.build_model(cfg, 0, device="meta")
    par.apply_pp(model, topo, rank)
    par.apply_ep(model, topo, rank, groups.ep if groups is not None else None)
    par.materialize(model, 0)
    adamw = dict(lr=lr, betas=(0.9, 0.95), eps=1e-8)
    if zero:
        from raymoe.train.zero import ZeroDataParallel

        return model, ZeroDataParallel(model, topo, rank, groups, clip, wd, adamw, bucket)
    opt = GuardedAdamW(param_groups(model, wd), **adamw)
    return model, par.NativeDataParallel(model, topo, rank, groups, opt, clip)


def train_rank(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    """One rank: train a replicated and a ZeRO-1 copy side by side; write what it measured to ``out/rank{r}.json``
    and (``spec["save"]``) each copy's checkpoint shard under ``out/ckpt_{zero,rep}``."""
    import torch.distributed as dist

    from raymoe.config import ModelConfig
    from raymoe.train import sharded
    from raymoe.train.topology import Topology, build_process_groups
    from raymoe.train.zero import optimizer_state_bytes

    torch.set_num_threads(1)
    cfg = ModelConfig.preset(spec.get("model", "tiny"))
    topo = Topology(1, spec["ep"], spec["dp"], "1f1b", 1, cfg)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = build_process_groups(topo, rank, 120) if world > 1 else None
    c = topo.coords(rank)
    kw = dict(lr=spec.get("lr", 1e-3), wd=spec.get("wd", 0.1), clip=spec.get("clip", 0.5),
              bucket=spec.get("bucket", 1 << 25))
    rep_model, rep = _build(cfg, topo, rank, groups, False, **kw)
    zero_model, zer = _build(cfg, topo, rank, groups, True, **kw)
    norms: dict[str, list[float]] = {"rep": [], "zero": []}
    T = spec.get("seq", 16)
    for step in range(spec.get("steps", 3)):
        g = torch.Generator().manual_seed(1000 * step + c.data_rank)
        ids = torch.randint(0, cfg.vocab_size, (spec.get("batch", 2), T + 1), generator=g)
        skip = step in spec.get("skip", ())
        for name, model, dp in (("rep", rep_model, rep), ("zero", zero_model, zer)):
            out_ = model(ids[:, :-1], labels=ids[:, 1:])
            out_.loss.backward()
            norms[name].append(dp.step(skip=skip))
    # per tensor: distance between the two runs against how far training moved the weights (a wrong gradient
    # moves a weight by the order of AdamW's step itself, whatever the gradient's size)
    from raymoe.train import parallelize as par

    w0 = par.build_model(cfg, 0, device="meta")
    par.apply_pp(w0, topo, rank)
    par.apply_ep(w0, topo, rank, groups.ep if groups is not None else None)
    w0 = dict(par.materialize(w0, 0).named_parameters())
    diff = 0.0
    zp = dict(zero_model.named_parameters())
    for n, p in rep_model.named_parameters():
        moved = float((p.detach() - w0[n].detach()).norm())
        if moved > 0:
            diff = max(diff, float((zp[n].detach() - p.detach()).norm()) / moved)
    res = {"rank": rank, "pp_rank": c.pp_rank, "ep_rank": c.ep_rank, "dp_rank": c.dp_rank,
           "state_bytes_rep": optimizer_state_bytes(rep.optimizer),
           "state_bytes_zero": optimizer_state_bytes(zer.optimizer),
           "owned_elements": sum(pc.numel for s in zer.sets for pc in s.pieces),
           "buckets": sum(len(s.buckets) for s in zer.sets),
           "weight_rel_diff": diff, "norms_rep": norms["rep"], "norms_zero": norms["zero"],
           "params": {n: p.detach().clone() for n, p in zero_model.named_parameters()} if spec.get("keep") else None}
    if spec.get("save"):
        sharded.save_rank(rep_model, rep.optimizer, topo, rank, pathlib.Path(out) / "ckpt_rep")
        sharded.save_rank(zero_model, zer.optimizer, topo, rank, pathlib.Path(out) / "ckpt_zero", zero=zer)
    if res["params"] is not None:
        from safetensors.torch import save_file

        save_file(res.pop("params"), str(pathlib.Path(out) / f"params{rank}.safetensors"))
    else:
        res.pop("params")
    pathlib.Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _entry(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    train_rank(rank, world, port, spec, out)


def spawn(spec: dict[str, Any], out: Optional[str] = None) -> list[dict[str, Any]]:
    """Run :func:`train_rank` on ``ep × dp`` processes; returns the ranks' JSON results."""
    import torch.multiprocessing as mp

    world = spec["ep"] * spec["dp"]
    out = out or tempfile.mkdtemp(prefix="zero_")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_entry, args=(world, _free_port(), spec, out), nprocs=world, start_method="spawn")
    return [json.loads(pathlib.Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _plan_bytes(model: str, ep: int, dp: int) -> tuple[float, float]:
    from raymoe.config import ModelConfig
    from raymoe.plan import Cluster, TrainLayout, plan_training

    plan = plan_training(ModelConfig.preset(model), TrainLayout(pp=1, ep=ep, dp=dp, zero1=True, precision="fp32"),
                         Cluster(num_nodes=1, gpus_per_node=ep * dp))
    r = plan.ranks[0]
    return r.optimizer, r.optimizer_unsharded


def run(args: dict[str, str]) -> dict[str, Any]:
    from rich.console import Console
    from rich.table import Table

    model = args.get("model", "tiny")
    steps = int(args.get("steps", "2"))
    layouts = args.get("layouts", "ep1dp2,ep2dp2,ep1dp4").split(",")
    rows = []
    table = Table(title=f"AdamW state per rank, model={model}: replicated native DP vs native ZeRO-1")
    for col in ("layout", "rank", "replicated MiB", "ZeRO-1 MiB", "ratio", "plan ZeRO-1 MiB", "plan unsharded MiB",
                "max |Δw| / |w - w0|", "max norm rel diff"):
        table.add_column(col, justify="right")
    for lay in layouts:
        ep, dp = (int(x) for x in lay.replace("ep", "").split("dp"))
        res = spawn({"model": model, "ep": ep, "dp": dp, "steps": steps, "bucket": int(args.get("bucket", 1 << 25))})
        plan_z, plan_u = _plan_bytes(model, ep, dp)
        for r in res:
            nd = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["norms_zero"], r["norms_rep"]))
            row = {"layout": lay, **{k: v for k, v in r.items() if not k.startswith("norms")},
                   "plan_zero1_bytes": plan_z, "plan_unsharded_bytes": plan_u, "norm_rel_diff": nd}
            rows.append(row)
            mib = 1024 ** 2
            table.add_row(lay, str(r["rank"]), f"{r['state_bytes_rep'] / mib:.3f}",
                          f"{r['state_bytes_zero'] / mib:.3f}", f"{r['state_bytes_rep'] / r['state_bytes_zero']:.2f}",
                          f"{plan_z / mib:.3f}", f"{plan_u / mib:.3f}", f"{r['weight_rel_diff']:.1e}", f"{nd:.1e}")
            if r["state_bytes_rep"] != plan_u:
                raise AssertionError(f"{lay} rank {r['rank']}: replicated state {r['state_bytes_rep']} B, the plan "
                                     f"says {plan_u} B")
            slack = 8 * ep * dp * r["buckets"]  # padding: < ep·dp elements of 2 fp32 moments per bucket
            if abs(r["state_bytes_zero"] - plan_z) > slack:
                raise AssertionError(f"{lay} rank {r['rank']}: ZeRO-1 state {r['state_bytes_zero']} B, the plan "
                                     f"says {plan_z:.0f} B (allowed padding {slack} B)")
            if r["weight_rel_diff"] > 1e-3 or nd > 1e-5:
                raise AssertionError(f"{lay} rank {r['rank']}: ZeRO-1 differs from replicated DP (weights "
                                     f"{r['weight_rel_diff']:.2e}, norms {nd:.2e})")
    Console(width=160).print(table)
    return {"model": model, "steps": steps, "rows": rows}
