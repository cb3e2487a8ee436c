"""dashboards/: the local report renders from a synthetic metrics.jsonl and the wandb workspace builds offline.

No Ray, no network. The synthetic run mimics the coordinator's MetricsLogger output: 30 steps, 2 routing layers x
8 experts, ``balance/counts`` and ``balance/bias`` every 5 steps, eval at steps 10/20/30, and a summary.json.
"""
from __future__ import annotations

import json
import pathlib
import struct
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # `dashboards` is a script folder, not an installed package

from dashboards.panels import load_panels  # noqa: E402
from dashboards.render_local import MetricsFileError, render  # noqa: E402

L, E, STEPS, HIST_EVERY, EVAL_EVERY = 2, 8, 30, 5, 10
SUMMARY = {"final_loss": 2.5, "steps": STEPS, "tokens": 983040, "wall_s": 12.75,
           "balance": {"maxvio_global": 0.125}, "status": "finished"}


def _maxvio(counts_E: np.ndarray) -> float:
    return float(counts_E.max() / counts_E.mean() - 1.0)


def write_synthetic_run(run_dir: pathlib.Path, *, eval_steps: bool = True, histograms: bool = True,
                        summary: bool = True) -> pathlib.Path:
    """A realistic metrics.jsonl: loss falls, aux-loss-free bias evens out an initially skewed expert load."""
    rng = np.random.default_rng(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    skew_LE = rng.normal(0.0, 1.0, size=(L, E))
    bias_LE = np.zeros((L, E))
    gamma, tokens_per_step = 1e-3, 32768
    lines = []
    for step in range(1, STEPS + 1):
        logits_LE = skew_LE * np.exp(-step / 10) + bias_LE
        p_LE = np.exp(logits_LE) / np.exp(logits_LE).sum(-1, keepdims=True)
        counts_LE = rng.multinomial(tokens_per_step * 8 // E, p_LE.reshape(-1) / L).reshape(L, E) + 1
        load_err_LE = counts_LE.mean(-1, keepdims=True) - counts_LE
        bias_LE = bias_LE + 0.05 * np.sign(load_err_LE)  # exaggerated gamma so trajectories are visible
        main = 10.4 * np.exp(-step / 12) + 2.4 + rng.normal(0, 0.03)
        mtp = main + 0.3
        rec = {"train/loss": main + 0.3 * mtp, "train/main_loss": main, "train/mtp_loss": mtp, "train/aux_loss": 0.0,
               "train/lr": 3e-4 * min(1.0, step / 5), "train/grad_norm": 4.0 * np.exp(-step / 15) + 0.3,
               "train/tokens": step * tokens_per_step, "train/skipped": 0,
               "perf/tokens_per_s": 1500 + rng.normal(0, 40), "perf/step_s": 21.8 + rng.normal(0, 0.5),
               "perf/mfu": 0.012 + rng.normal(0, 0.0005),
               "balance/maxvio_batch": float(np.mean([_maxvio(c) for c in counts_LE])),
               "balance/bias_std": float(bias_LE.std()), "balance/gamma": gamma}
        rec.update({f"balance/maxvio_batch/layer_{i}": _maxvio(counts_LE[i]) for i in range(L)})
        if histograms and step % HIST_EVERY == 0:
            rec["balance/counts"] = counts_LE.astype(int).tolist()
            rec["balance/bias"] = bias_LE.tolist()
        if eval_steps and step % EVAL_EVERY == 0:
            rec.update({"val/loss": main + 0.1, "val/mtp_loss": mtp + 0.1, "balance/maxvio_global": 0.125})
        lines.append(json.dumps({"step": step, **{k: float(v) if isinstance(v, np.floating) else v
                                                  for k, v in rec.items()}}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary:
        (run_dir / "summary.json").write_text(json.dumps(SUMMARY))
    return run_dir


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    """Width and height from the PNG signature + IHDR chunk (fails if the file is not a PNG)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_render_full_run(tmp_path: pathlib.Path) -> None:
    run = write_synthetic_run(tmp_path / "run")
    paths = render(run, tmp_path / "out")
    assert set(paths) == {"loss", "throughput", "balance", "optimizer", "expert_load", "router_bias", "report"}
    for name, p in paths.items():
        assert p.is_file() and p.parent == tmp_path / "out", name
        if p.suffix == ".png":
            w, h = _png_size(p)
            assert w >= 400 and h >= 250, (name, w, h)
            assert p.stat().st_size > 10_000, (name, p.stat().st_size)  # not a blank canvas
    page = paths["report"].read_text()
    assert page.count("data:image/png;base64,") == 6
    assert "<img" in page and "src='report" not in page  # self-contained: no file references
    for key, value in [("final_loss", "2.5"), ("steps", "30"), ("tokens", "983040"), ("wall_s", "12.75"),
                       ("balance.maxvio_global", "0.125"), ("status", "finished")]:
        assert f"<td>{key}</td><td>{value}</td>" in page, key
    assert "<td>val/loss</td>" in page  # last-values table includes the eval metric


# what each validation metric measures -> the training metric that measures the same on training batches
COMPARABLE = {"val/loss": "train/main_loss", "val/mtp_loss": "train/mtp_loss"}


def test_panels_pair_train_and_val_metrics_that_measure_the_same_thing() -> None:
    """A panel that draws a validation loss draws beside it only its training counterpart (not the λ-weighted
    objective), and every validation loss has a panel with its counterpart."""
    spec = load_panels()
    paired = set()
    for section in spec.sections:
        for panel in section.panels:
            vals = [m for m in panel.y if m.startswith("val/")]
            if not vals:
                continue
            assert all(v in COMPARABLE for v in vals), (panel.title, vals)
            trains = {m for m in panel.y if m.startswith("train/")}
            assert trains == {COMPARABLE[v] for v in vals}, (panel.title, panel.y)
            paired |= set(vals)
    assert paired == set(COMPARABLE)


def test_render_without_eval_counts_or_summary(tmp_path: pathlib.Path) -> None:
    run = write_synthetic_run(tmp_path / "run", eval_steps=False, histograms=False, summary=False)
    paths = render(run)  # default out dir: <run>/report
    assert set(paths) == {"loss", "throughput", "balance", "optimizer", "report"}
    assert paths["report"].parent == run / "report"
    page = paths["report"].read_text()
    assert "no summary.json" in page
    assert "balance/counts was not logged" in page and "balance/bias was not logged" in page
    assert page.count("data:image/png;base64,") == 4


def test_render_dedups_resumed_steps_and_skips_partial_line(tmp_path: pathlib.Path) -> None:
    from dashboards.render_local import load_records

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "train/loss": 5.0}\n{"step": 2, "train/loss": 4.0}\n'
                 '{"step": 2, "train/loss": 3.0}\n{"step": 3, "train/lo')
    with pytest.warns(UserWarning, match="skipped 1 unreadable line"):
        recs = load_records(p)
    assert [(r["step"], r["train/loss"]) for r in recs] == [(1, 5.0), (2, 3.0)]


def test_render_missing_metrics_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        render(tmp_path)


@pytest.mark.filterwarnings("ignore:.*unreadable line")
@pytest.mark.parametrize("content", ["", "\n\n", "not json\n", '{"loss": 1.0}\n'])
def test_render_empty_metrics_is_a_clear_error(tmp_path: pathlib.Path, content: str) -> None:
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(MetricsFileError, match="holds no metrics record"):
        render(tmp_path)


def test_workspace_dump_has_every_panel_metric(tmp_path: pathlib.Path) -> None:
    pytest.importorskip("wandb_workspaces", reason="wandb-workspaces not installed (pip install 'wandb-workspaces==0.4.*')")
    from dashboards.workspace import main

    out = tmp_path / "ws.json"
    assert main(["--entity", "e", "--project", "raymoe", "--dump", str(out)]) == 0
    view = json.loads(out.read_text())
    sections = view["spec"]["section"]["panel_bank_config"]["sections"]
    spec = load_panels()
    assert [s["name"] for s in sections] == [s.name for s in spec.sections] + ["Expert load"]
    named = {m for s in sections for p in s["panels"] for m in p["config"]["metrics"] or []}
    regexes = [p["config"]["metric_regex"] for s in sections for p in s["panels"] if p["config"]["metric_regex"]]
    assert set(spec.scalar_metrics()) <= named
    for panel in (p for s in spec.sections for p in s.panels if p.y_regex):
        assert panel.wandb_regex() in regexes
    assert r"^balance/load/layer_\d+$" in regexes and r"^balance/bias_hist/layer_\d+$" in regexes


def test_workspace_per_layer_panels_and_apply_without_key(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("wandb_workspaces", reason="wandb-workspaces not installed (pip install 'wandb-workspaces==0.4.*')")
    from dashboards.workspace import build_workspace, main

    ws = build_workspace("e", "raymoe", num_layers=L)
    load = [p for p in ws.sections[-1].panels]
    assert [p.y for p in load] == [[f"balance/load/layer_{i}"] for i in range(L)] + \
        [[f"balance/bias_hist/layer_{i}"] for i in range(L)]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path))  # no ~/.config/wandb, no netrc key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert main(["--entity", "e", "--project", "raymoe", "--apply"]) == 2
    assert "WANDB_API_KEY" in capsys.readouterr().err


def test_workspace_without_package_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dashboards.workspace import main

    for mod in [m for m in sys.modules if m == "wandb_workspaces" or m.startswith("wandb_workspaces.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # makes `import wandb_workspaces` raise ImportError
    assert main(["--entity", "e", "--project", "p"]) == 1
    assert "pip install" in capsys.readouterr().err
