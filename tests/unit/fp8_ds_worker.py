"""DeepSpeed + FP8 scenarios, run in a subprocess by ``test_fp8_deepspeed.py`` (keeps torch.distributed state and the
DeepSpeed import out of the pytest process). Prints one ``RESULT {json}`` line.

    python tests/unit/fp8_ds_worker.py single            # world of one: all single-rank checks
    RANK=r WORLD_SIZE=2 MASTER_PORT=p python tests/unit/fp8_ds_worker.py dp2   # one rank of a 2-rank ZeRO-1 group
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from raymoe.fp8 import FP8Config, FP8Linear, WeightGradStore, fp8_layers  # noqa: E402
from raymoe.fp8 import deepspeed_hooks as dsh  # noqa: E402

D = 128


class Net(nn.Module):
    """Regression MLP with names the default filter must respect (``head`` stays high precision)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(D, 2 * D)
        self.fc2 = nn.Linear(2 * D, D)
        self.fc3 = nn.Linear(D, D)
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))
        h = h + self.fc3(torch.tanh(h))
        return self.head(h)


def make_engine(seed: int = 0, *, store: WeightGradStore | None = None, opt: str = "adamw", clip: float = 1.0,
                grad_accum: int = 2):
    torch.manual_seed(seed)
    model = Net()
    factory = (lambda p: torch.optim.AdamW(p, lr=3e-3)) if opt == "adamw" else (lambda p: torch.optim.SGD(p, lr=1.0))
    extra = {"zero_allow_untested_optimizer": True} if opt != "adamw" else None
    cfg = dsh.ds_config(micro_batch_size=16, grad_accum=grad_accum, grad_clip=clip, extra=extra)
    return dsh.initialize(model, factory, cfg, fp8=FP8Config(enabled=True), wgrad_store=store)


def data(step: int, rank: int = 0, n_mb: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    target = torch.Generator().manual_seed(7)
    w = torch.randn(D, D, generator=target) / D**0.5
    out = []
    for _ in range(n_mb):
        x = torch.randn(16, D, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def loss_fn(engine, mb) -> torch.Tensor:
    x, y = mb
    return (engine(x.to(torch.bfloat16)).float() - y).pow(2).mean()


def params(engine) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in engine.module.parameters()]


def scenario_single() -> dict:
    dsh.init_single_process_dist()
    res: dict = {}
    # -- immediate vs deferred Wgrad: bit-identical ---------------------------------------------------------------
    eng, guard = make_engine(0)
    store = WeightGradStore()
    eng_d, guard_d = make_engine(0, store=store)
    res["converted"] = sorted(fp8_layers(eng.module))
    res["head_type"] = type(eng.module.head).__name__
    res["param_dtype"] = str(next(eng.module.parameters()).dtype)
    res["optimizer"] = type(eng.optimizer).__name__
    losses, norms = [], []
    for step in range(6):
        r = dsh.train_step(eng, data(step), loss_fn, guard)
        rd = dsh.train_step(eng_d, data(step), loss_fn, guard_d, wgrad_store=store)
        assert r.applied and rd.applied, (r, rd)
        losses.append(r.loss)
        norms.append(r.grad_norm)
    res["losses"] = losses
    res["grad_norms"] = norms
    res["deferred_identical"] = all(torch.equal(a, b) for a, b in zip(params(eng), params(eng_d)))
    res["deferred_store_empty"] = len(store) == 0
    del eng_d, guard_d

    # -- non-finite step: named, skipped, nothing applied --------------------------------------------------------
    before = params(eng)
    skipped_before = eng.skipped_steps
    bad = data(6)
    bad[0][0][3, 5] = float("inf")
    r = dsh.train_step(eng, bad, loss_fn, guard)
    res["nan_applied"] = r.applied
    res["nan_problems"] = r.problems
    res["nan_params_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, params(eng)))
    res["nan_skipped_delta"] = eng.skipped_steps - skipped_before
    r = dsh.train_step(eng, data(7), loss_fn, guard)
    res["after_nan_applied"] = r.applied and not r.problems

    # -- checkpoint save/load: continuing from the checkpoint reproduces the run ---------------------------------
    ckpt = tempfile.mkdtemp(prefix="fp8ds_")
    eng.save_checkpoint(ckpt, tag="t")
    res["ckpt_files"] = sorted(os.listdir(os.path.join(ckpt, "t")))
    cont = [dsh.train_step(eng, data(s), loss_fn, guard).loss for s in (8, 9)]
    p_cont = params(eng)
    dsh.load_checkpoint(eng, ckpt, tag="t")
    for layer in fp8_layers(eng.module).values():
        assert isinstance(layer, FP8Linear)
    again = [dsh.train_step(eng, data(s), loss_fn, guard).loss for s in (8, 9)]
    res["ckpt_losses"] = [cont, again]
    res["ckpt_params_identical"] = all(torch.equal(a, b) for a, b in zip(p_cont, params(eng)))
    del eng

    # -- gradient clipping (SGD lr=1 so the update is the clipped gradient) --------------------------------------
    eng_c, guard_c = make_engine(1, opt="sgd", clip=0.25, grad_accum=1)
    p0 = params(eng_c)

    def big_loss(engine, mb):
        return 100.0 * loss_fn(engine, mb)

    r = dsh.train_step(eng_c, data(0, n_mb=1), big_loss, guard_c)
    delta = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(params(eng_c), p0))).item()
    res["clip"] = {"grad_norm": r.grad_norm, "update_norm": delta, "applied": r.applied}
    return res


def scenario_dp2() -> dict:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    eng, guard = make_engine(0)
    losses = [dsh.train_step(eng, data(s, rank), loss_fn, guard).loss for s in range(3)]
    flat = torch.cat([p.flatten() for p in params(eng)])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    torch.distributed.all_gather(gathered, flat)
    return {"rank": rank, "losses": losses, "ranks_identical": bool(torch.equal(gathered[0], gathered[1])),
            "world": torch.distributed.get_world_size()}


if __name__ == "__main__":
    which = sys.argv[1]
    out = {"single": scenario_single, "dp2": scenario_dp2}[which]()
    print("RESULT " + json.dumps(out), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # The result is out; skip interpreter teardown, where a still-joinable comm thread (gloo / DeepSpeed shm) now
    # and then aborted the process ("terminate called without an active exception", seen once in ~10 runs).
    sys.stdout.flush()
    os._exit(0)
