"""Resuming from a checkpoint never executes code from it, and every resume checks the sha256 manifest.

Attack model: a checkpoint directory whose manifest is *consistent* (the attacker re-ran
:func:`raymoe.checkpoint.commit` after planting the file, so every checksum matches) but whose content is hostile: a
pickle whose ``__reduce__`` runs code (here: creates a marker file). The manifest only protects against damage; the
loaders must refuse the content. Checked for the DeepSpeed engine files (model states, ZeRO optimizer states), the RNG
file and ``coordinator.safetensors``, with ``train.resume=<path>`` and ``train.resume=auto``; a tampered file
*without* a re-committed manifest is rejected by the checksum before anything is unpickled, for an explicit path
(error) and for ``auto`` (falls back to the previous checkpoint with a warning naming the file).

The DeepSpeed run (tiny model, world of one, 3 steps, checkpoints at steps 2 and 3) and every resume attempt run in
one subprocess (this file run as a script), so torch.distributed state and the DeepSpeed import stay out of the
pytest process (the project's pattern, see ``test_fp8_deepspeed.py``); it prints one ``RESULT {json}`` line.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import pytest
import torch

HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[2]
MODEL_STATES = "stage0/engine/mp_rank_00_model_states.pt"
OPTIM_STATES = "stage0/engine/zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG = "stage0/rng_dp0.pt"
COORD = "coordinator.safetensors"
# case -> file planted with a hostile pickle (manifest re-committed, so checksums match)
HOSTILE = {"model_states": MODEL_STATES, "optim_states": OPTIM_STATES, "rng": RNG, "coordinator": COORD}


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile checkpoint would do (with any code)."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return exec, (f"open({self.marker!r}, 'w').close()",)


# ---------------------------------------------------------------------- subprocess side
def _run_config(run_dir: pathlib.Path, resume: str = "never", steps: int = 3) -> Any:
    from raymoe.config import BalanceConfig, DataConfig, LoggerConfig, ModelConfig, ParallelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig.preset("tiny"),
        parallel=ParallelConfig(dp=1, dp_impl="deepspeed"),
        train=TrainConfig(steps=steps, micro_batch_size=2, num_microbatches=2, checkpoint_every=2, eval_every=100,
                          eval_batches=1, warmup_tokens=200, seed=0, resume=resume, export_hf=False),
        data=DataConfig(seq_len=32),
        logger=LoggerConfig(kind="none"),
        balance=BalanceConfig(histogram_every=100),
        run_dir=str(run_dir),
    )


def _plant(src: pathlib.Path, root: pathlib.Path, rel: str, write: Callable[[pathlib.Path], None],
           recommit: bool = True) -> pathlib.Path:
    """Copy checkpoint ``src`` under ``root``, overwrite its file ``rel`` with ``write``, and (``recommit``) hash it
    into a fresh manifest with :func:`raymoe.checkpoint.commit`, as an attacker with the checkpoint's tools would."""
    from raymoe import checkpoint as ckpt

    manifest = json.loads((src / "manifest.json").read_text())
    if recommit:
        tmp = ckpt.new_tmp_dir(root, manifest["step"])
        shutil.rmtree(tmp)
        shutil.copytree(src, tmp)
        (tmp / "manifest.json").unlink()
        write(tmp / rel)
        return ckpt.commit(tmp, manifest["step"], {"tokens": manifest["tokens"]})
    dst = root / src.name
    shutil.copytree(src, dst)
    write(dst / rel)
    return dst


def _hostile_pt(marker: pathlib.Path) -> Callable[[pathlib.Path], None]:
    """Keep the real file's content and add one hostile object (a torch.save file like the original)."""

    def write(p: pathlib.Path) -> None:
        sd = torch.load(p, weights_only=False)  # our own, freshly written file (trusted)
        if not isinstance(sd, dict):
            sd = {"state": sd}
        sd["__payload__"] = Payload(marker)
        torch.save(sd, p)

    return write


def _hostile_raw(marker: pathlib.Path) -> Callable[[pathlib.Path], None]:
    def write(p: pathlib.Path) -> None:
        p.write_bytes(pickle.dumps(Payload(marker)))

    return write


def scenario(work: pathlib.Path) -> dict[str, Any]:
    from raymoe import checkpoint as ckpt
    from raymoe.data import prepare_data
    from raymoe.train.controller import TrainController
    from raymoe.train.worker_group import LocalWorkerGroup

    records: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, r: logging.LogRecord) -> None:
            records.append({"name": r.name, "level": r.levelname, "msg": r.getMessage()})

    logging.getLogger("raymoe").addHandler(Collect(logging.WARNING))
    res: dict[str, Any] = {"timings": {}}
    t0 = time.perf_counter()
    run = _run_config(work / "train")
    info = prepare_data(run, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    group = LocalWorkerGroup(run, port)
    res["timings"]["init_s"] = time.perf_counter() - t0

    params: list[dict[str, torch.Tensor]] = []
    inner_step = group.step

    def step(plans):  # record the weights after every step
        out = inner_step(plans)
        params.append(group.worker.param_state())
        return out

    group.step = step  # type: ignore[method-assign]

    def controller(run_cfg: Any) -> TrainController:
        return TrainController(run_cfg, group, info["train_samples"], info["val_samples"])

    t1 = time.perf_counter()
    c = controller(run)
    ref = c.run_loop()
    c.close()
    res["timings"]["train_s"] = time.perf_counter() - t1
    ckpts = ckpt.list_checkpoints(pathlib.Path(run.run_dir) / "checkpoints")
    res["checkpoints"] = [p.name for p in ckpts]
    step2, step3 = ckpts[-2], ckpts[-1]
    res["files"] = sorted(json.loads((step3 / "manifest.json").read_text())["files"])

    def attempt(case: str, run_cfg: Any) -> dict[str, Any]:
        records.clear()
        out: dict[str, Any] = {"error": None, "error_type": None}
        cc = controller(run_cfg)
        try:
            cc.resume_if_requested()
            out.update(resumed_from=cc.resumed_from, step=cc.step)
        except Exception as e:  # what a user sees: the type and the message
            out.update(error=str(e), error_type=type(e).__name__)
        finally:
            cc.close()
        out["warnings"] = list(records)
        out["marker_created"] = (work / f"{case}.marker").exists()
        return out

    t2 = time.perf_counter()
    cases: dict[str, Any] = {}
    # (a) hostile pickles with consistent manifests, explicit resume path
    for case, rel in HOSTILE.items():
        marker = work / f"{case}.marker"
        write = _hostile_raw(marker) if rel == COORD else _hostile_pt(marker)
        target = _plant(step3, work / case / "checkpoints", rel, write)
        cases[case] = attempt(case, _run_config(work / case, resume=str(target)))
        cases[case]["target"] = str(target)
    # (b) the same with train.resume=auto: latest_valid verifies step 3 (consistent), the load must still refuse it
    auto_root = work / "auto_hostile" / "checkpoints"
    _plant(step2, auto_root, MODEL_STATES, lambda p: None)
    target = _plant(step3, auto_root, MODEL_STATES, _hostile_pt(work / "auto_hostile.marker"))
    cases["auto_hostile"] = attempt("auto_hostile", _run_config(work / "auto_hostile", resume="auto"))
    cases["auto_hostile"]["target"] = str(target)
    # (c) tampered without re-committing the manifest: the checksum rejects it before anything is unpickled
    target = _plant(step3, work / "tampered" / "checkpoints", MODEL_STATES, _hostile_pt(work / "tampered.marker"),
                    recommit=False)
    cases["tampered"] = attempt("tampered", _run_config(work / "tampered", resume=str(target)))
    cases["tampered"]["target"] = str(target)
    auto_root = work / "auto_tampered" / "checkpoints"
    _plant(step2, auto_root, MODEL_STATES, lambda p: None)
    target = _plant(step3, auto_root, MODEL_STATES, _hostile_pt(work / "auto_tampered.marker"), recommit=False)
    cases["auto_tampered"] = attempt("auto_tampered", _run_config(work / "auto_tampered", resume="auto"))
    cases["auto_tampered"]["target"] = str(target)
    res["timings"]["attacks_s"] = time.perf_counter() - t2

    # (d) a clean checkpoint still loads through the weights-only loader: weights of step 2, and the continued run
    # reproduces step 3's loss exactly (so the ZeRO optimizer state came back too)
    t3 = time.perf_counter()
    target = _plant(step2, work / "clean" / "checkpoints", MODEL_STATES, lambda p: None)
    cc = controller(_run_config(work / "clean", resume=str(target)))
    cc.resume_if_requested()
    now = group.worker.param_state()
    res["clean_params_are_step2"] = all(torch.equal(now[n], params[1][n]) for n in now)
    res["clean_params_differ_from_step3"] = any(not torch.equal(now[n], params[2][n]) for n in now)
    cont = cc.run_loop()
    cc.close()
    res["clean_resumed_from"] = cont["resumed_from"]
    res["losses"] = [ref["losses"], cont["losses"]]
    res["timings"]["clean_s"] = time.perf_counter() - t3
    res["cases"] = cases
    group.worker.close()
    return res


# ---------------------------------------------------------------------- pytest side
@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("deepspeed")
    work = tmp_path_factory.mktemp("ckpt_safety")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE), str(work)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, out[-6000:]
    res = json.loads(lines[-1][len("RESULT "):])
    res["timings"]["subprocess_s"] = time.perf_counter() - t0
    res["work"] = str(work)
    return res


def test_payload_runs_code_when_unpickled_unsafely(tmp_path: pathlib.Path) -> None:
    """Control: the payload is live (a plain ``torch.load(weights_only=False)`` runs it), so the refusals below are
    the loaders' doing; the worker's weights-only loader refuses the same file, naming it."""
    from raymoe.checkpoint import CheckpointCorrupt
    from raymoe.train.deepspeed_worker import safe_torch_load

    f = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(tmp_path / "safe.marker")}, f)
    with pytest.raises(CheckpointCorrupt, match="evil.pt") as ei:
        safe_torch_load(f)
    msg = str(ei.value)
    assert "Unsupported global: GLOBAL exec" in msg and "weights_only=False" not in msg and "trust" not in msg, msg
    assert not (tmp_path / "safe.marker").exists()
    g = tmp_path / "control.pt"
    torch.save({"x": Payload(tmp_path / "control.marker")}, g)
    torch.load(g, weights_only=False)
    assert (tmp_path / "control.marker").exists()


def test_run_wrote_the_expected_deepspeed_files(ds: dict[str, Any]) -> None:
    assert ds["checkpoints"] == ["step_00000002", "step_00000003"]
    for rel in HOSTILE.values():
        assert rel in ds["files"], ds["files"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_pickle_with_consistent_manifest_is_refused(ds: dict[str, Any], case: str) -> None:
    r = ds["cases"][case]
    assert not r["marker_created"] and not (pathlib.Path(ds["work"]) / f"{case}.marker").exists(), \
        f"{case}: the checkpoint's code ran"
    assert r["error_type"] == "CheckpointCorrupt", r
    assert str(pathlib.Path(r["target"]) / HOSTILE[case]) in r["error"], r["error"]  # names the file
    if case != "coordinator":  # coordinator.safetensors is parsed by safetensors, which has no code path at all
        assert "refusing to load" in r["error"] and "Unsupported global: GLOBAL exec" in r["error"], r["error"]
        assert "trust" not in r["error"], r["error"]  # no advice to allowlist the payload
    assert "Traceback" not in r["error"] and len(r["error"]) < 800, r["error"]


def test_auto_resume_refuses_a_hostile_latest_checkpoint(ds: dict[str, Any]) -> None:
    r = ds["cases"]["auto_hostile"]
    assert not r["marker_created"]
    assert r["error_type"] == "CheckpointCorrupt", r
    assert str(pathlib.Path(r["target"]) / MODEL_STATES) in r["error"], r["error"]


def test_tampered_file_is_rejected_by_the_checksum_on_explicit_resume(ds: dict[str, Any]) -> None:
    r = ds["cases"]["tampered"]
    assert not r["marker_created"]
    assert r["error_type"] == "CheckpointCorrupt", r
    assert f"{MODEL_STATES} checksum mismatch" in r["error"] or f"{MODEL_STATES} has" in r["error"], r["error"]
    assert r["target"] in r["error"]


def test_tampered_latest_is_skipped_by_auto_resume(ds: dict[str, Any]) -> None:
    r = ds["cases"]["auto_tampered"]
    assert not r["marker_created"]
    assert r["error"] is None, r
    assert r["resumed_from"].endswith("step_00000002") and r["step"] == 2
    warned = [w for w in r["warnings"] if w["name"] == "raymoe.checkpoint" and w["level"] == "WARNING"]
    assert any(MODEL_STATES in w["msg"] and r["target"] in w["msg"] for w in warned), r["warnings"]


def test_clean_checkpoint_still_resumes_exactly(ds: dict[str, Any]) -> None:
    assert ds["clean_params_are_step2"] and ds["clean_params_differ_from_step3"]
    assert ds["clean_resumed_from"].endswith("step_00000002")
    ref, cont = ds["losses"]
    assert cont == ref, (ref, cont)


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    result = scenario(pathlib.Path(sys.argv[1]))
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (gloo / DeepSpeed comm threads; see fp8_ds_worker.py)
