"""Routed-expert rows read straight from a HF DeepseekV3 checkpoint: what an expert shard loads into its slots.

With remote expert shards (``experts.backend: remote``, ``experts.remote.expert_weights: checkpoint``) the engine
replica holds only attention, dense and shared-expert weights (the DP-attention / EP-experts split); each shard
reads the rows of the experts its slots hold from the model's checkpoint itself (:class:`CheckpointExperts`), when
the engine places or moves a slot (the ``FETCH`` op of :mod:`raymoe.engine.shard_protocol`) and when a dead
shard's slots are re-planned onto the survivors. No routed-expert byte crosses the engine.

Only the asked-for rows are read (:class:`raymoe.safetensors_slices.SliceReader`: one ranged read per tensor, or per
run of consecutive experts in a fused tensor): with the usual one-``nn.Linear``-per-expert layout
(``model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight``, out×in) an expert is three tensors; with
transformers 5's fused ``mlp.experts.gate_up_proj [E, 2I, D]`` / ``down_proj [E, D, I]`` an expert is one row of
each. FP8 weights (``weight_scale_inv`` block scales) are dequantised as :func:`raymoe.model.hf.load` does. The
checkpoint is a local directory or any URI :class:`raymoe.storage.Storage` opens (``s3://``, ``gs://``, ...: ranged
``read_range`` calls, nothing downloaded beyond the rows and the headers).

Layer keys are the serving ones (``"layers.3"``, ``"mtp.0"`` → checkpoint layer ``num_hidden_layers + 0``); rows come
back in raymoe's layout (gate/up ``[m, D, I]``, down ``[m, I, D]``) and the asked dtype, exactly the tensors
:func:`raymoe.model.hf.load` would stack for those experts.
"""
from __future__ import annotations

import json
import re
import threading
from typing import Any, Optional

import torch

from raymoe import safetensors_slices as sts

__all__ = ["CheckpointExperts", "layer_index"]

_KEY_RE = re.compile(r"^(layers|mtp)\.(\d+)$")
_SIDE_FILES = {"expert_load.safetensors"}


def layer_index(layer_key: str, num_hidden_layers: int) -> int:
    """The checkpoint's decoder-layer index of a serving layer key (MTP depth k is layer ``N + k``)."""
    m = _KEY_RE.match(layer_key)
    if m is None:
        raise KeyError(f"layer key {layer_key!r} is neither 'layers.<i>' nor 'mtp.<k>'")
    i = int(m.group(2))
    return i if m.group(1) == "layers" else num_hidden_layers + i


class CheckpointExperts:
    """Reads routed-expert rows of one checkpoint (module docstring). Thread-safe (one lock around the readers).

    Args:
        uri: the checkpoint directory (``config.json`` + ``*.safetensors``, optionally an index): a local path or a
            storage URI.

    Attributes: ``config`` (:class:`raymoe.config.ModelConfig`), ``num_experts`` / ``dim`` / ``inter_dim``, and
    ``bytes_read`` (headers included: what a test compares with the rows' size).
    """

    def __init__(self, uri: str) -> None:
        from raymoe.model.hf import CheckpointError, config_from_hf
        from raymoe.storage import Storage, is_local

        self.uri = str(uri)
        self._lock = threading.Lock()
        local = is_local(self.uri)
        self._storage = Storage(self.uri)
        self._local_root = self._storage.local_root if local else None
        try:
            hf_cfg = json.loads(self._storage.read_bytes("config.json"))
        except FileNotFoundError:
            raise CheckpointError(f"{self.uri} has no config.json") from None
        if not isinstance(hf_cfg, dict):
            raise CheckpointError(f"{self.uri}/config.json is not a JSON object")
        self.config = config_from_hf(hf_cfg)
        self.block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
        self.num_experts = int(self.config.n_routed_experts)
        self.dim, self.inter_dim = int(self.config.hidden_size), int(self.config.moe_intermediate_size)
        self._readers: dict[str, sts.SliceReader] = {}
        self._where: dict[str, str] = {}  # tensor name -> file
        files = self._files()
        for f in files:
            for k in self._reader(f).keys():
                self._where[k] = f
        self._header_bytes = self.bytes_read

    # ------------------------------------------------------------------ files
    def _files(self) -> list[str]:
        from raymoe.model.hf import CheckpointError

        if self._storage.exists("model.safetensors.index.json"):
            wm = json.loads(self._storage.read_bytes("model.safetensors.index.json")).get("weight_map") or {}
            files = sorted(set(wm.values()))
            for f in files:  # an index is data: it may only name files of this directory
                if not isinstance(f, str) or "/" in f or "\\" in f or not f.endswith(".safetensors"):
                    raise CheckpointError(f"{self.uri}: index names {f!r}; only *.safetensors files of the "
                                          "checkpoint directory are allowed")
        else:
            files = sorted(k for k in self._storage.list() if "/" not in k and k.endswith(".safetensors")
                           and k not in _SIDE_FILES)
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.uri}")
        return files

    def _reader(self, f: str) -> sts.SliceReader:
        r = self._readers.get(f)
        if r is None:
            if self._local_root is not None:
                r = sts.SliceReader.open(self._local_root / f)
            else:
                st = self._storage
                r = sts.SliceReader(lambda off, n, f=f: st.read_range(f, off, n), st.uri_of(f), st.size(f))
            self._readers[f] = r
        return r

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self._readers.values())

    @property
    def row_bytes_read(self) -> int:
        """Bytes read for expert rows (everything after the headers read at construction)."""
        return self.bytes_read - self._header_bytes

    def _get(self, key: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        from raymoe.model.hf import CheckpointError, _dequant_fp8

        if key not in self._where:
            raise CheckpointError(f"{self.uri}: no tensor {key!r}")
        t = self._reader(self._where[key]).get(key, rows)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            sk = key[: -len("weight")] + "weight_scale_inv" if key.endswith("weight") else key + "_scale_inv"
            if sk not in self._where:
                raise CheckpointError(f"{self.uri}: {key!r} is FP8 but {sk!r} (its block scales) is missing")
            s = self._reader(self._where[sk]).get(sk, rows)
            if rows is None:
                t = _dequant_fp8(t, s, key, self.block)
            else:  # fused [E, ...] FP8 tensors: dequantise each expert's matrix with its own scales
                t = torch.stack([_dequant_fp8(t[j], s[j], key, self.block) for j in range(t.shape[0])])
        return t

    # ------------------------------------------------------------------ rows
    def rows(self, layer_key: str, experts: list[int], dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """gate ``[m, D, I]``, up ``[m, D, I]``, down ``[m, I, D]`` of ``experts`` (logical ids, any order, repeats
        allowed) of ``layer_key``, in ``dtype``. Raises KeyError / CheckpointError for a layer or expert the
        checkpoint does not hold."""
        from raymoe.model.hf import CheckpointError

        L = layer_index(layer_key, self.config.num_hidden_layers)
        E, D, I = self.num_experts, self.dim, self.inter_dim  # noqa: E741
        bad = [e for e in experts if not 0 <= int(e) < E]
        if bad:
            raise KeyError(f"experts {bad[:8]} outside [0, {E})")
        m = len(experts)
        gate, up, down = (torch.empty(m, D, I, dtype=dtype), torch.empty(m, D, I, dtype=dtype),
                          torch.empty(m, I, D, dtype=dtype))
        pre = f"model.layers.{L}.mlp.experts."
        with self._lock, torch.no_grad():
            if pre + "gate_up_proj" in self._where:  # transformers 5 fused layout: rows of [E, ...] tensors
                order = sorted(set(int(e) for e in experts))
                got: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
                for a, b in _runs(order):
                    gu = self._get(pre + "gate_up_proj", (a, b))  # [n, 2I, D]
                    dn = self._get(pre + "down_proj", (a, b))  # [n, D, I]
                    if tuple(gu.shape[1:]) != (2 * I, D) or tuple(dn.shape[1:]) != (D, I):
                        raise CheckpointError(f"{self.uri}: layer {L} fused experts have shapes "
                                              f"{tuple(gu.shape)} / {tuple(dn.shape)}, expected [E, {2 * I}, {D}] / "
                                              f"[E, {D}, {I}]")
                    g, u = gu.chunk(2, dim=1)
                    for j, e in enumerate(range(a, b)):
                        got[e] = (g[j].t(), u[j].t(), dn[j].t())
                for j, e in enumerate(experts):
                    gate[j], up[j], down[j] = got[int(e)]
                return gate, up, down
            done: dict[int, int] = {}
            for j, e in enumerate(experts):
                e = int(e)
                if e in done:
                    k = done[e]
                    gate[j], up[j], down[j] = gate[k], up[k], down[k]
                    continue
                for name, out, shape in (("gate_proj", gate, (I, D)), ("up_proj", up, (I, D)),
                                         ("down_proj", down, (D, I))):
                    w = self._get(f"{pre}{e}.{name}.weight")
                    if tuple(w.shape) != shape:
                        raise CheckpointError(f"{self.uri}: {pre}{e}.{name}.weight has shape {tuple(w.shape)}, "
                                              f"expected {list(shape)}")
                    out[j] = w.t()
                done[e] = j
        return gate, up, down

    def close(self) -> None:
        with self._lock:
            for r in self._readers.values():
                r.close()
            self._readers.clear()


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted distinct ids → ``[(a, b), ...]`` half-open runs of consecutive ids."""
    out: list[tuple[int, int]] = []
    for e in ids:
        if out and out[-1][1] == e:
            out[-1] = (out[-1][0], e + 1)
        else:
            out.append((e, e + 1))
    return out
