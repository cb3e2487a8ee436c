"""What the coordinator itself keeps in a checkpoint, and whether a checkpoint fits a run.

``coordinator.json`` (plain values) + ``coordinator.safetensors`` (tensors) hold the step, tokens, data position,
balancer and metrics state — never a pickle, so a hostile checkpoint cannot execute code. :func:`check_compatible`
refuses a checkpoint of another model or optimizer format with one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Optional

import torch

from raymoe import checkpoint as ckpt
from raymoe.config import ConfigError, RunConfig

__all__ = ["save_coordinator_state", "load_coordinator_state", "check_compatible", "plain"]


def save_coordinator_state(d: pathlib.Path, state: dict[str, Any]) -> None:
    """``coordinator.json`` (plain values) + ``coordinator.safetensors`` (tensors): never a pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def split(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(obj, dict):
            return {k: split(v, f"{path}.{k}") for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [split(v, f"{path}.{i}") for i, v in enumerate(obj)]
        return obj

    values = split(state, "state")
    (d / "coordinator.json").write_text(json.dumps(plain(values)))
    save_file(tensors, str(d / "coordinator.safetensors"))


def load_coordinator_state(d: pathlib.Path) -> dict[str, Any]:
    """Inverse of :func:`save_coordinator_state`; errors name the file."""
    from safetensors.torch import load_file

    jpath, tpath = d / "coordinator.json", d / "coordinator.safetensors"
    try:
        values = json.loads(jpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointCorrupt(f"{jpath}: unreadable coordinator state ({e})") from e
    try:
        tensors = load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types
        raise ckpt.CheckpointCorrupt(f"{tpath}: unreadable coordinator tensors ({e})") from e

    def join(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            return {k: join(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [join(v) for v in obj]
        return obj

    return join(values)


def check_compatible(target: pathlib.Path, run: RunConfig, impl: str, name: Optional[str] = None) -> None:
    """Raise :class:`ConfigError` when a checkpoint cannot be loaded into this run (model or optimizer format).
    ``target``: a local directory with the checkpoint's ``config.json`` / ``layout.json``; ``name``: how messages
    call the checkpoint (its storage URI when ``target`` is a scratch copy)."""
    cfg_path, lay_path = target / "config.json", target / "layout.json"
    name = name or str(target)
    if cfg_path.exists():
        saved = json.loads(cfg_path.read_text()).get("model", {})
        mine = plain(dataclasses.asdict(run.model))
        diff = [k for k in sorted(set(saved) | set(mine))
                if k not in ("name", "mtp_loss_weight", "seq_aux_loss_alpha") and saved.get(k) != mine.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(f"checkpoint {name} is of a different model: model.{k}={saved.get(k)!r} there, "
                              f"{mine.get(k)!r} here; resume with the checkpoint's model settings or "
                              f"train.resume=never")
    if lay_path.exists():
        saved_impl = json.loads(lay_path.read_text()).get("dp_impl", "deepspeed")
    else:
        saved_impl = "deepspeed"
    if saved_impl != impl:
        raise ConfigError(f"checkpoint {name} was written by parallel.dp_impl={saved_impl} but this run uses "
                          f"{impl}; set parallel.dp_impl={saved_impl} (re-sharding between layouts needs native "
                          "checkpoints on both sides)")


def plain(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj
