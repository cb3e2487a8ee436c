"""Initial weights that do not depend on which process builds them: one random stream per parameter name.

A 671B model cannot be built whole in one process and then pruned, so every rank builds the model on the meta device
(shapes only), cuts away what other ranks hold (pipeline stages, other ep ranks' experts) and only then gives its own
parameters storage and values. For the distributed run to equal the one-process run, a parameter's initial value must
be a function of ``(seed, its full-model name)`` alone — not of how many other tensors the process drew before it, as
with one global generator. Hence:

* each parameter is filled from its own ``torch.Generator`` seeded with ``H(seed, name)`` (the first 8 bytes of
  ``sha256(f"{seed}/{name}")``): the same values whichever subset of the model a process materializes;
* a routed-expert tensor ``[E, ...]`` draws each expert's row from a generator of ``H(seed, f"{name}/{e}")`` with
  ``e`` the **global** expert id, so ep rank r's ``[E/ep, ...]`` slice equals rows ``r·E/ep..`` of the full tensor;
* the distributions are the V3 recipe: Normal(0, ``initializer_range``) for every matrix (embedding, projections,
  router gate, experts), ones for RMSNorm weights, zero router bias; RoPE's ``inv_freq`` is recomputed from the config.

Values are drawn on the CPU (fp32) and copied to the target device, so a CUDA rank holds exactly the CPU build's
numbers. Names are the full-model names (``layers.3.mlp.experts.gate_proj``) that :class:`DeepSeekV3`'s own
``named_parameters()`` gives; the pruned and expert-sharded models of :mod:`raymoe.train.parallelize` keep them.

Example::

    m = DeepSeekV3(cfg, device="meta")   # no storage
    init_weights(m, seed=0)              # storage on the default device, the seed's weights
"""
from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from raymoe.model.layers import RMSNorm
from raymoe.model.moe import RoutedExperts, Router
from raymoe.model.rope import RotaryEmbedding

__all__ = ["init_weights", "param_seed"]


def param_seed(seed: int, name: str) -> int:
    """64-bit generator seed of tensor (or expert row) ``name`` in a run seeded with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def _normal(t: torch.Tensor, std: float, seed: int, name: str) -> None:
    g = torch.Generator(device="cpu").manual_seed(param_seed(seed, name))
    if t.device.type == "cpu" and t.dtype == torch.float32:
        t.normal_(0.0, std, generator=g)
    else:  # draw in fp32 on the CPU: every device and dtype gets the CPU build's numbers
        t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def _fill(mod: nn.Module, pname: str, p: torch.Tensor, name: str, seed: int, std: float) -> None:
    if isinstance(mod, RMSNorm):
        p.fill_(1.0)
    elif isinstance(mod, RoutedExperts):  # one stream per global expert: an ep slice equals rows of the full tensor
        for row, e in enumerate(mod.expert_ids):
            _normal(p[row], std, seed, f"{name}/{e}")
    elif isinstance(mod, (nn.Linear, nn.Embedding, Router)) and pname == "weight":
        _normal(p, std, seed, name)
    else:
        raise ValueError(f"no initialization rule for parameter {name!r} of {type(mod).__name__}")


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: Optional[torch.device | str] = None) -> nn.Module:
    """Give every parameter of ``model`` its initial value for ``seed`` (module docstring), in place.

    Parameters on the meta device first get storage on ``device`` (default: ``torch.get_default_device()``; a
    parameter shared by two modules stays one Parameter), so building on meta, pruning and then calling this
    allocates exactly the parameters that remain. Parameters that already have storage are overwritten where they
    are. Buffers: router biases are zeroed, RoPE frequencies recomputed. Returns ``model``.
    """
    dev = torch.device(device) if device is not None else torch.get_default_device()
    std = float(model.config.initializer_range) if hasattr(model, "config") else 0.02
    names = {id(p): n for n, p in model.named_parameters()}
    done: dict[int, nn.Parameter] = {}
    for _, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) in done:  # shared: already materialized and filled under its first name
                mod._parameters[pname] = done[id(p)]
                continue
            new = p
            if p.device.type == "meta":
                new = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=dev), requires_grad=p.requires_grad)
                mod._parameters[pname] = new
            _fill(mod, pname, new, names[id(p)], seed, std)
            done[id(p)] = new
        if isinstance(mod, Router):
            b = mod.expert_bias
            mod.expert_bias = torch.zeros(b.shape, dtype=torch.float32, device=dev if b.is_meta else b.device)
        elif isinstance(mod, RotaryEmbedding):
            mod.reset_buffers(dev if mod.inv_freq.is_meta else mod.inv_freq.device)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ValueError(f"buffers left on the meta device (no initialization rule): {left[:5]}")
    return model
