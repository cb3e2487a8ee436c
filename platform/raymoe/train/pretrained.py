"""Start a run from pretrained weights: ``train.init_from=<HF DeepseekV3 directory or storage URI>``.

Three steps, each a function so the wiring can change without touching the others:

1. :func:`model_config` — the run's model is the checkpoint's (``config.json`` through
   :func:`raymoe.model.hf.config_from_hf`); a ``model.*`` setting the user gave explicitly must agree with it (one
   line naming the key and both values otherwise). The MTP depth is what the checkpoint's *tensors* hold
   (transformers' ``save_pretrained`` writes none whatever its config says); an explicit
   ``model.num_nextn_predict_layers`` may ask for more: those depths start from a fresh initialisation.
2. :func:`load_pretrained` — after a rank has built (and pruned / expert-sharded) its model, copy in the tensors it
   holds (:func:`raymoe.model.hf.load_into`: a tensor of another rank's layers or experts is never read).
3. :func:`initial_biases` — the router biases (``e_score_correction_bias``) as the balancer's starting state: the
   coordinator owns the biases and sends them with every step, so they must start there, not only in the ranks.

A storage URI (``s3://...``) is copied once per node into node-local scratch (:func:`raymoe.storage.materialize`,
reused while the store's listing is unchanged); every rank of the node reads from that copy. A resumed run loads
its own checkpoint over these weights.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Optional

import torch

from raymoe.config import ConfigError, ModelConfig
from raymoe.model import hf

__all__ = ["local_dir", "model_config", "load_pretrained", "initial_biases"]

log = logging.getLogger(__name__)
# model fields the run owns (loss weights: train.mtp_lambda / balance.alpha) or that only label the config
_NOT_ARCHITECTURE = ("name", "mtp_loss_weight", "seq_aux_loss_alpha")


def local_dir(src: str) -> pathlib.Path:
    """The checkpoint as a local directory (a node-local copy for a storage URI)."""
    from raymoe.storage import materialize

    try:
        d = materialize(src)
    except FileNotFoundError as e:
        raise ConfigError(f"train.init_from={src}: {e}") from None
    if not (d / "config.json").is_file():
        raise ConfigError(f"train.init_from={src}: no config.json there (expected a HF DeepseekV3 checkpoint "
                          "directory: config.json + *.safetensors)")
    return d


def model_config(src: str, explicit: Optional[dict[str, Any]] = None) -> ModelConfig:
    """The model config of checkpoint ``src``, checked against the ``model.*`` values the user set explicitly.

    Args:
        src: ``train.init_from``.
        explicit: ``{field: value}`` of the ``model.*`` overrides the user gave (not the preset's values).
    Raises:
        ConfigError: an explicit value contradicts the checkpoint, or the checkpoint is unreadable.
    """
    d = local_dir(src)
    try:
        _, cfg = hf.read_config(d)
        present = hf.mtp_depth_present(d, cfg.num_hidden_layers)
    except hf.CheckpointError as e:
        raise ConfigError(f"train.init_from={src}: {e}") from None
    explicit = dict(explicit or {})
    depth = explicit.pop("num_nextn_predict_layers", present)
    if depth != present:
        log.warning("train.init_from=%s holds %d MTP depth(s); model.num_nextn_predict_layers=%d: %s", src, present,
                    depth, "depths beyond them start from a fresh initialisation" if depth > present
                    else "the extra ones are not loaded")
    mine = dataclasses.asdict(cfg)
    for key, value in explicit.items():
        if key in _NOT_ARCHITECTURE or key not in mine:
            continue
        theirs = mine[key]
        if key == "rope_scaling" and value is not None and not isinstance(value, dict):
            value = dataclasses.asdict(value)
        if value != theirs:
            raise ConfigError(f"model.{key}={value!r} contradicts train.init_from's config.json ({key}={theirs!r}); "
                              f"the model comes from the checkpoint: drop the override")
    return cfg.replace(num_nextn_predict_layers=depth)


def load_pretrained(model: torch.nn.Module, src: str) -> None:
    """Copy the checkpoint's tensors that ``model`` (a rank's possibly pruned, expert-sharded model, built with
    :func:`model_config`'s config) holds into it, in place."""
    d = local_dir(src)
    present = hf.mtp_depth_present(d, model.config.num_hidden_layers)
    kept = hf.load_into(model, d, fresh_mtp=model.config.num_nextn_predict_layers > present)
    bad = [k for k in kept if int(k.split(".")[1]) < present]
    if bad:
        raise hf.CheckpointError(f"{src}: MTP depth tensors missing from the checkpoint, e.g. {bad[:3]}")
    if kept:
        log.info("init_from %s: %d MTP tensors start fresh (the checkpoint has %d MTP depth(s))", src, len(kept),
                 present)


def initial_biases(src: str, cfg: ModelConfig) -> torch.Tensor:
    """``[num_router_layers, E]`` router biases of the checkpoint (zeros for layers without one: fresh MTP)."""
    return hf.expert_biases(local_dir(src), cfg)
