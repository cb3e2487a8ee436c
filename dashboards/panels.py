"""Typed view of ``dashboards/panels.yaml``: the one layout that the wandb workspace and the local report share.

The YAML only lists metric names (the fixed namespace of ``platform/raymoe/metrics.py``) and how they are grouped;
this module checks it (unknown keys, empty panels and bad regexes fail with the file and field named) and answers
the questions both renderers ask: which keys does a panel draw, what regex does wandb get, which scalar metrics
exist at all.

Example::

    >>> spec = load_panels()
    >>> [s.name for s in spec.sections]
    ['Loss', 'Throughput', 'Balance', 'Optimizer']
    >>> spec.sections[2].panels[0].wandb_regex()
    '^(?:balance/maxvio_batch|balance/maxvio_batch/layer_\\\\d+)$'
"""
from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import yaml

__all__ = ["DEFAULT_PANELS", "ExpertMatrix", "Panel", "PanelsError", "PanelsSpec", "Section", "load_panels"]

DEFAULT_PANELS = pathlib.Path(__file__).resolve().with_name("panels.yaml")

_MATRIX_KINDS = ("heatmap", "trajectories")


class PanelsError(ValueError):
    """panels.yaml is malformed; the message names the file and the offending field."""


@dataclass(frozen=True)
class Panel:
    """One chart: explicit scalar keys ``y`` plus, optionally, a family of keys matched by ``y_regex``."""

    title: str
    y: tuple[str, ...] = ()
    y_regex: Optional[str] = None
    y_label: Optional[str] = None
    log_y: bool = False

    def __post_init__(self) -> None:
        if not self.y and not self.y_regex:
            raise PanelsError(f"panel {self.title!r}: give `y` (metric keys) and/or `y_regex`")
        if self.y_regex is not None:
            try:
                re.compile(self.y_regex)
            except re.error as e:
                raise PanelsError(f"panel {self.title!r}: y_regex {self.y_regex!r} does not compile: {e}") from e

    def matches_regex(self, key: str) -> bool:
        """True if ``key`` belongs to the panel's regex family (and is not one of the explicit ``y`` keys)."""
        return self.y_regex is not None and key not in self.y and re.fullmatch(self.y_regex, key) is not None

    def wandb_regex(self) -> Optional[str]:
        """Anchored metric regex for a wandb LinePlot, or None for a plain ``y`` panel.

        wandb ignores the explicit metric list once a panel uses a regex, so the ``y`` keys are folded in.
        """
        if self.y_regex is None:
            return None
        alternatives = [re.escape(k) for k in self.y] + [self.y_regex]
        return "^(?:" + "|".join(alternatives) + ")$"


@dataclass(frozen=True)
class Section:
    """A named group of panels (a wandb workspace section; one PNG in the local report)."""

    name: str
    panels: tuple[Panel, ...]

    @property
    def slug(self) -> str:
        """File-name-safe lower-case name, e.g. ``"Loss"`` -> ``"loss"``."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


@dataclass(frozen=True)
class ExpertMatrix:
    """A list-valued JSONL entry shaped ``[routing layer][expert]`` (e.g. ``balance/counts``).

    ``kind="heatmap"``: local panel per layer, x = step, y = expert, colour = share of the layer's tokens.
    ``kind="trajectories"``: local panel per layer, one line per expert over steps.
    ``wandb_key`` is the per-layer histogram key template of the wandb run (``{layer}`` = layer index).
    """

    name: str
    title: str
    jsonl_key: str
    wandb_key: str
    kind: str
    value_label: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _MATRIX_KINDS:
            raise PanelsError(f"expert_matrices[{self.name!r}].kind={self.kind!r}; allowed: {', '.join(_MATRIX_KINDS)}")
        if "{layer}" not in self.wandb_key:
            raise PanelsError(f"expert_matrices[{self.name!r}].wandb_key={self.wandb_key!r} must contain '{{layer}}'")

    def wandb_keys(self, num_layers: int) -> list[str]:
        """Per-layer wandb keys for layers ``0 .. num_layers-1``."""
        return [self.wandb_key.format(layer=i) for i in range(num_layers)]

    def wandb_regex(self) -> str:
        """Anchored regex matching the per-layer wandb keys of any layer count."""
        head, tail = self.wandb_key.split("{layer}", 1)
        return "^" + re.escape(head) + r"\d+" + re.escape(tail) + "$"


@dataclass(frozen=True)
class PanelsSpec:
    """The whole layout file."""

    workspace_name: str
    x_axis: str
    sections: tuple[Section, ...]
    expert_matrices: tuple[ExpertMatrix, ...]
    source: str = "<memory>"

    def scalar_metrics(self) -> list[str]:
        """Every explicit scalar key of every panel, in layout order, without duplicates."""
        out: list[str] = []
        for s in self.sections:
            for p in s.panels:
                out.extend(k for k in p.y if k not in out)
        return out

    def all_metric_names(self) -> list[str]:
        """Scalar keys, panel regexes and expert-matrix JSONL keys: everything the layout names."""
        names = self.scalar_metrics()
        names += [p.y_regex for s in self.sections for p in s.panels if p.y_regex]
        names += [m.jsonl_key for m in self.expert_matrices]
        return names


def _check_keys(where: str, d: Any, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise PanelsError(f"{where}: expected a mapping, got {type(d).__name__}")
    allowed = set(allowed)
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PanelsError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in d]
    if missing:
        raise PanelsError(f"{where}: missing field(s) {missing}")
    return d


def _str_list(where: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise PanelsError(f"{where}: expected a list of metric names, got {v!r}")
    return tuple(v)


def load_panels(path: str | pathlib.Path | None = None) -> PanelsSpec:
    """Read and validate a panels file (default: ``dashboards/panels.yaml`` next to this module).

    Raises:
        FileNotFoundError: the file does not exist.
        PanelsError: a field is unknown, missing or of the wrong type (the message names file and field).
    """
    path = pathlib.Path(path) if path is not None else DEFAULT_PANELS
    if not path.is_file():
        raise FileNotFoundError(f"panels file not found: {path}")
    raw = yaml.safe_load(path.read_text())
    try:
        top = _check_keys(str(path), raw, ("workspace_name", "x_axis", "sections", "expert_matrices"), ("sections",))
        sections = []
        for i, s in enumerate(top["sections"] or []):
            s = _check_keys(f"sections[{i}]", s, ("name", "panels"), ("name", "panels"))
            panels = []
            for j, p in enumerate(s["panels"] or []):
                where = f"sections[{i}].panels[{j}]"
                p = _check_keys(where, p, ("title", "y", "y_regex", "y_label", "log_y"), ("title",))
                panels.append(Panel(title=str(p["title"]), y=_str_list(f"{where}.y", p.get("y", [])),
                                    y_regex=p.get("y_regex"), y_label=p.get("y_label"), log_y=bool(p.get("log_y", False))))
            if not panels:
                raise PanelsError(f"sections[{i}] ({s['name']!r}) has no panels")
            sections.append(Section(name=str(s["name"]), panels=tuple(panels)))
        matrices = []
        for i, m in enumerate(top.get("expert_matrices") or []):
            m = _check_keys(f"expert_matrices[{i}]", m,
                            ("name", "title", "jsonl_key", "wandb_key", "kind", "value_label"),
                            ("name", "jsonl_key", "wandb_key", "kind"))
            matrices.append(ExpertMatrix(name=str(m["name"]), title=str(m.get("title", m["name"])),
                                         jsonl_key=str(m["jsonl_key"]), wandb_key=str(m["wandb_key"]),
                                         kind=str(m["kind"]), value_label=str(m.get("value_label", ""))))
    except PanelsError as e:
        raise PanelsError(f"{path}: {e}") from None
    slugs = [s.slug for s in sections] + [m.name for m in matrices]
    dupes = sorted({x for x in slugs if slugs.count(x) > 1})
    if dupes:
        raise PanelsError(f"{path}: section/matrix names collide as file names: {dupes}")
    return PanelsSpec(workspace_name=str(top.get("workspace_name", "raymoe training")),
                      x_axis=str(top.get("x_axis", "step")), sections=tuple(sections),
                      expert_matrices=tuple(matrices), source=str(path))
