"""Build the wandb Workspace (saved view) for raymoe training runs from ``dashboards/panels.yaml``.

Usage::

    python dashboards/workspace.py --entity E --project P [--dump out.json] [--apply] [--num-layers N]

Building runs offline (wandb-workspaces objects are plain pydantic models). ``--dump`` writes the JSON view spec
through the private ``Workspace._to_model()`` (checked against wandb-workspaces 0.4.13; guarded so a newer release
fails with a clear message rather than an AttributeError). ``--apply`` calls ``Workspace.save()``, which needs an
API key and a reachable wandb server; with neither the error is reported and the exit status is 2.

Panel mapping: each panels.yaml section becomes a workspace section and each panel a LinePlot over wandb's step
(the ``step=`` the coordinator passes to ``run.log``). Regex panels (per-layer MaxVio) become a ``metric_regex``
LinePlot that also matches the panel's explicit keys, because wandb ignores the metric list of a regex panel. Expert
matrices go to a closed "Expert load" section: one histogram-over-steps LinePlot per routing layer when
``--num-layers`` is given, else one regex LinePlot per matrix.

Exit status: 0 ok, 1 wandb_workspaces missing or panels.yaml invalid, 2 save/dump failed.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # run as `python dashboards/workspace.py`: import the package by file location
    sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent))

from dashboards.panels import PanelsError, PanelsSpec, load_panels  # noqa: E402

__all__ = ["WorkspacesUnavailable", "build_workspace", "main", "workspace_spec_json"]

_INSTALL_HINT = 'pip install "wandb-workspaces==0.4.*"  (tested: 0.4.13 with wandb 0.31)'


class WorkspacesUnavailable(ImportError):
    """The optional ``wandb_workspaces`` package is not installed."""


def _import_workspaces() -> tuple[Any, Any]:
    """Return ``(wandb_workspaces.workspaces, wandb_workspaces.reports.v2)`` or raise WorkspacesUnavailable."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as e:
        raise WorkspacesUnavailable(f"wandb_workspaces is not importable ({e}); install it with: {_INSTALL_HINT}") from e
    return ws, wr


def build_workspace(entity: str, project: str, spec: Optional[PanelsSpec] = None, *,
                    name: Optional[str] = None, num_layers: Optional[int] = None) -> Any:
    """Build (offline) a ``wandb_workspaces.workspaces.Workspace`` from the panels layout.

    Args:
        entity: wandb entity (user or team) that owns the project.
        project: wandb project the coordinator logs to (``logger.project``).
        spec: parsed panels.yaml; default ``load_panels()``.
        name: view name; default ``spec.workspace_name``.
        num_layers: routing-layer count for one histogram panel per layer; None = one regex panel per matrix.

    Returns:
        The Workspace (not saved).

    Raises:
        WorkspacesUnavailable: wandb_workspaces is not installed.
    """
    ws, wr = _import_workspaces()
    spec = spec or load_panels()
    sections = []
    for s in spec.sections:
        plots = []
        for p in s.panels:
            kw: dict[str, Any] = dict(title=p.title, x="Step", y=list(p.y), title_y=p.y_label)
            if p.log_y:
                kw["log_y"] = True
            if p.wandb_regex() is not None:
                kw["metric_regex"] = p.wandb_regex()
            plots.append(wr.LinePlot(**kw))
        sections.append(ws.Section(name=s.name, panels=plots, is_open=True))
    if spec.expert_matrices:
        plots = []
        for m in spec.expert_matrices:
            if num_layers:
                plots += [wr.LinePlot(title=f"{m.title}: layer {i}", x="Step", y=[key])
                          for i, key in enumerate(m.wandb_keys(num_layers))]
            else:
                plots.append(wr.LinePlot(title=m.title, x="Step", y=[], metric_regex=m.wandb_regex()))
        sections.append(ws.Section(name="Expert load", panels=plots, is_open=False))
    return ws.Workspace(entity=entity, project=project, name=name or spec.workspace_name, sections=sections,
                        settings=ws.WorkspaceSettings(x_axis="Step"))


def workspace_spec_json(workspace: Any, indent: Optional[int] = 2) -> str:
    """The JSON view spec that ``save()`` would upload (private ``_to_model()``; see the module docstring).

    Raises:
        RuntimeError: this wandb-workspaces version has no compatible ``_to_model()``.
    """
    to_model = getattr(workspace, "_to_model", None)
    if to_model is None:
        raise RuntimeError("this wandb_workspaces version has no Workspace._to_model(); --dump relies on that private "
                           f"API (tested with 0.4.13). Pin {_INSTALL_HINT}")
    model = to_model()
    if not hasattr(model, "model_dump_json"):
        raise RuntimeError(f"Workspace._to_model() returned {type(model).__name__} without model_dump_json(); "
                           f"--dump was tested with wandb-workspaces 0.4.13")
    return model.model_dump_json(indent=indent)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Build the raymoe wandb workspace from dashboards/panels.yaml.")
    ap.add_argument("--entity", required=True, help="wandb entity (user or team)")
    ap.add_argument("--project", required=True, help="wandb project the runs log to (logger.project)")
    ap.add_argument("--name", default=None, help="view name (default: workspace_name of panels.yaml)")
    ap.add_argument("--panels", default=None, help="panels file (default: dashboards/panels.yaml)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="routing layers: one expert-load panel per layer instead of one regex panel")
    ap.add_argument("--dump", default=None, metavar="OUT.json", help="write the JSON view spec here")
    ap.add_argument("--apply", action="store_true", help="save the view to wandb (needs an API key and network)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status (see the module docstring)."""
    args = _parse_args(argv)
    try:
        spec = load_panels(args.panels)
        workspace = build_workspace(args.entity, args.project, spec, name=args.name, num_layers=args.num_layers)
    except (WorkspacesUnavailable, FileNotFoundError, PanelsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n_panels = sum(len(s.panels) for s in workspace.sections)
    print(f"built workspace {workspace.name!r} for {args.entity}/{args.project}: "
          f"{len(workspace.sections)} sections, {n_panels} panels")
    status = 0
    if args.dump:
        try:
            out = pathlib.Path(args.dump)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(workspace_spec_json(workspace))
            print(f"wrote spec to {out}")
        except (RuntimeError, OSError) as e:
            print(f"error: --dump failed: {e}", file=sys.stderr)
            status = 2
    if args.apply:
        try:
            workspace.save()
        except Exception as e:  # wandb raises UsageError (no key), CommError/HTTPError (network, auth), ...
            print(f"error: --apply could not save the workspace to wandb: {type(e).__name__}: {e}\n"
                  "  Saving needs an API key (set WANDB_API_KEY or run `wandb login`) and a reachable wandb server "
                  "(WANDB_BASE_URL); use --dump to inspect the spec offline.", file=sys.stderr)
            return 2
        print(f"saved workspace: {getattr(workspace, 'url', '(url unavailable)')}")
    return status


if __name__ == "__main__":
    sys.exit(main())
