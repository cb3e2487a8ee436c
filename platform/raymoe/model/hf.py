"""HuggingFace DeepseekV3 checkpoint import/export (config.json + safetensors, sharded or not).

``load(path) -> DeepSeekV3`` (fp32, CPU) and ``save(model, path)``. Loading never unpickles: only ``safetensors``
files are read (``*.bin``/``*.pt`` are refused). The mapping between checkpoint names and ours is the declarative
table ``_PARAM_MAP`` below plus three structural rules:

* routed experts: the checkpoint stores one ``nn.Linear`` per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
  out×in); we stack them as ``[E, in, out]`` (``x @ w`` layout for grouped matmuls). transformers 5 fused tensors
  (``mlp.experts.gate_up_proj [E, 2I, D]``, ``mlp.experts.down_proj [E, D, I]``) are accepted too;
* the load-balancing bias is ``mlp.gate.e_score_correction_bias`` there and ``mlp.router.expert_bias`` here (fp32);
* MTP depth k is stored as decoder layer index ``num_hidden_layers + k - 1`` (``enorm``, ``hnorm``, ``eh_proj``,
  ``shared_head.norm``, the block's own attention/MoE tensors, and copies of the shared ``embed_tokens`` and
  ``shared_head.head``). Checkpoints written by ``transformers`` carry no MTP tensors even though their config says
  ``num_nextn_predict_layers: 1``; with ``mtp="auto"`` (default) such a checkpoint loads with MTP depth 0 and a warning,
  while a *partially* present MTP layer is an error.

FP8 checkpoints (``weight`` in e4m3 with a ``weight_scale_inv`` 128×128 block-scale tensor, the released V3 format)
are dequantised on load: ``w = q · scale_inv[i//128, j//128]`` (the stored "inverse" scale is the multiplier).
Every unknown tensor, missing tensor, shape mismatch and non-DeepseekV3 config raises :class:`CheckpointError` naming
the tensor or field. The parity test (tests/unit/test_hf_parity.py) checks logits against ``transformers`` 5.23.
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import re
from typing import Any, Callable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from raymoe.config import ConfigError, ModelConfig, RopeScaling
from raymoe.jsonfile import load_object
from raymoe.model.transformer import DeepSeekV3

__all__ = ["load", "load_into", "read_config", "mtp_depth_present", "expert_biases", "save", "config_from_hf",
           "config_to_hf", "CheckpointError"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint directory, config or tensor does not match what a DeepseekV3 model needs."""


# HF name (after "model.layers.{i}.") → ours (after "layers.{i}." or "mtp.{k}.block."): 1:1 copies.
_PARAM_MAP: dict[str, str] = {
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attn.q_a_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "self_attn.kv_a_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "mlp.gate.weight": "mlp.router.weight",
    "mlp.gate.e_score_correction_bias": "mlp.router.expert_bias",
    "mlp.shared_experts.gate_proj.weight": "mlp.shared_experts.gate_proj.weight",
    "mlp.shared_experts.up_proj.weight": "mlp.shared_experts.up_proj.weight",
    "mlp.shared_experts.down_proj.weight": "mlp.shared_experts.down_proj.weight",
}
_MTP_OWN: dict[str, str] = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "head_norm.weight",
}
_MTP_SHARED: dict[str, str] = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}
_TOP: dict[str, str] = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_EXPERT_RE = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED_RE = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a DeepseekV3 ``config.json`` dict (transformers 4 or 5 style) onto :class:`ModelConfig`."""
    mt = hf.get("model_type")
    archs = hf.get("architectures") or []
    if mt != "deepseek_v3" and "DeepseekV3ForCausalLM" not in archs:
        raise CheckpointError(f"not a DeepseekV3 checkpoint: model_type={mt!r}, architectures={archs}; only deepseek_v3 is supported")
    checks = {
        "topk_method": ("noaux_tc", hf.get("topk_method", "noaux_tc")),
        "scoring_func": ("sigmoid", hf.get("scoring_func", "sigmoid")),
        "hidden_act": ("silu", hf.get("hidden_act", "silu")),
        "rope_interleave": (True, hf.get("rope_interleave", True)),
        "attention_bias": (False, hf.get("attention_bias", False)),
        "tie_word_embeddings": (False, hf.get("tie_word_embeddings", False)),
    }
    for key, (want, got) in checks.items():
        if got != want:
            raise CheckpointError(f"config.json {key}={got!r} is not supported (raymoe implements {key}={want!r})")
    heads = hf["num_attention_heads"]
    if hf.get("num_key_value_heads", heads) != heads:
        raise CheckpointError(f"config.json num_key_value_heads={hf['num_key_value_heads']} must equal num_attention_heads={heads} (MLA)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None
    if rtype == "yarn":
        rope_scaling = RopeScaling(
            factor=float(rope["factor"]),
            original_max_position_embeddings=int(rope.get("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))),
            beta_fast=float(rope.get("beta_fast", 32)),
            beta_slow=float(rope.get("beta_slow", 1)),
            mscale=float(rope.get("mscale", 1.0) or 0.0),
            mscale_all_dim=float(rope.get("mscale_all_dim", 0.0) or 0.0),
        )
    elif rtype not in ("default", None):
        raise CheckpointError(f"config.json rope type {rtype!r} is not supported (only default and yarn)")
    fields = {
        k: hf[k]
        for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "first_k_dense_replace", "intermediate_size",
            "moe_intermediate_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group",
            "topk_group", "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps", "max_position_embeddings",
        )
        if k in hf
    }
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts") if k not in fields]
    if missing:
        raise CheckpointError(f"config.json lacks required fields {missing}")
    fields["num_nextn_predict_layers"] = int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)
    if "initializer_range" in hf:
        fields["initializer_range"] = hf["initializer_range"]
    try:
        return ModelConfig(name="hf", rope_theta=rope_theta, rope_scaling=rope_scaling, **fields)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"config.json is inconsistent: {e}") from e


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    rope = cfg.rope_scaling.to_hf(cfg.rope_theta) if cfg.rope_scaling else {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "first_k_dense_replace": cfg.first_k_dense_replace,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_group": cfg.n_group,
        "topk_group": cfg.topk_group,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "norm_topk_prob": cfg.norm_topk_prob,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_interleave": True,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
        "initializer_range": cfg.initializer_range,
        "torch_dtype": "float32",
    }


# ---------------------------------------------------------------------- reading
_SIDE_FILES = {"expert_load.safetensors"}


def _tensor_files(path: pathlib.Path) -> list[pathlib.Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        for f in set(weight_map.values()):
            # an index is data from whoever wrote the checkpoint: it may only name files of this directory
            if (not isinstance(f, str) or not f or "/" in f or "\\" in f or f in (".", "..")
                    or not f.endswith(".safetensors")):
                raise CheckpointError(f"{index}: weight_map names {f!r}; only *.safetensors files of this "
                                      "directory are allowed (no paths)")
        files = sorted({path / f for f in weight_map.values()})
    else:
        # weights only: other safetensors files beside them (raymoe's expert_load.safetensors) are not the model
        files = sorted(f for f in path.glob("*.safetensors") if f.name not in _SIDE_FILES)
    if not files:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found pickle files {pickled}: raymoe never unpickles; convert them to safetensors)" if pickled else ""
        raise CheckpointError(f"no *.safetensors files in {path}{hint}")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"index lists {f.name} but it is missing from {path}")
    return files


def _iter_tensors(files: list[pathlib.Path]) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {f.name}: {e}") from e
        for key in handle.keys():
            yield key, (lambda h=handle, k=key: h.get_tensor(k))


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, name: str, block: tuple[int, int]) -> torch.Tensor:
    N, K = w.shape
    bn, bk = block
    if (math.ceil(N / bn), math.ceil(K / bk)) != tuple(scale_inv.shape):
        raise CheckpointError(f"{name}: weight_scale_inv {tuple(scale_inv.shape)} does not tile weight {tuple(w.shape)}")
    s = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return w.float() * s


def load(path: str | pathlib.Path, mtp: str = "auto", dtype: torch.dtype = torch.float32,
         routed_experts: bool = True) -> DeepSeekV3:
    """Load a HF DeepseekV3 checkpoint directory into a :class:`DeepSeekV3` on CPU.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (optionally ``model.safetensors.index.json``).
        mtp: ``"auto"`` (MTP loaded if present, dropped with a warning if entirely absent), ``"require"``, ``"drop"``.
        dtype: parameter dtype (router biases stay fp32).
        routed_experts: False: the routed-expert tensors are not read and every MoE's ``experts`` is an
            :class:`~raymoe.model.moe.AbsentExperts` (a serving engine whose experts live in remote shards that
            read them from this checkpoint themselves).
    """
    path = pathlib.Path(path)
    if mtp not in ("auto", "require", "drop"):
        raise ValueError(f"mtp must be 'auto', 'require' or 'drop', got {mtp!r}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    hf_cfg = load_object(cfg_file.read_bytes(), str(cfg_file), CheckpointError)
    cfg = config_from_hf(hf_cfg)
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    files = _tensor_files(path)
    loaders = dict(_iter_tensors(files))

    N, depth = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp_keys = [k for k in loaders if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= N]
    if depth and not mtp_keys and mtp == "auto":
        log.warning("checkpoint config has num_nextn_predict_layers=%d but no MTP tensors (layer >= %d): loading without MTP", depth, N)
        depth = 0
    if mtp == "drop":
        depth = 0
    cfg = cfg.replace(num_nextn_predict_layers=depth)
    model = DeepSeekV3(cfg, device="meta")
    ours = dict(model.state_dict(keep_vars=True))
    filled: dict[str, torch.Tensor] = {}
    shared_copies: list[tuple[str, torch.Tensor, str]] = []
    experts_pending: dict[str, dict[int, torch.Tensor]] = {}

    def put(our: str, t: torch.Tensor, src: str, transpose: bool = False) -> None:
        ref = ours.get(our)
        if ref is None:
            raise CheckpointError(f"unexpected tensor {src!r}: the model has no {our!r} (config mismatch?)")
        if transpose:
            t = t.t()
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"shape mismatch for {src!r}: checkpoint {tuple(t.shape)}, model {our!r} expects {tuple(ref.shape)}")
        filled[our] = t.to(torch.float32 if our.endswith("expert_bias") else dtype).contiguous()

    def get(key: str) -> torch.Tensor:
        t = loaders[key]()
        scale_key = key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else None
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            if scale_key is None or scale_key not in loaders:
                raise CheckpointError(f"{key!r} is FP8 but {scale_key!r} (its block scales) is missing")
            t = _dequant_fp8(t, loaders[scale_key](), key, block)
        return t

    for key in sorted(loaders):
        if key.endswith("weight_scale_inv"):
            continue
        if key in _TOP:
            put(_TOP[key], get(key), key)
            continue
        m = _LAYER_RE.match(key)
        if not m:
            raise CheckpointError(f"unknown tensor {key!r} in checkpoint")
        idx, rest = int(m.group(1)), m.group(2)
        if idx >= N:
            k = idx - N
            if k >= cfg.num_nextn_predict_layers:
                if mtp == "drop" or k < int(hf_cfg.get("num_nextn_predict_layers", 0) or 0):
                    continue
                raise CheckpointError(f"unknown tensor {key!r}: layer {idx} is beyond num_hidden_layers + MTP depth")
            prefix = f"mtp.{k}."
            if rest in _MTP_OWN:
                put(prefix + _MTP_OWN[rest], get(key), key)
                continue
            if rest in _MTP_SHARED:
                shared_copies.append((key, get(key), _MTP_SHARED[rest]))
                continue
            prefix += "block."
        else:
            prefix = f"layers.{idx}."
        if rest in _PARAM_MAP:
            put(prefix + _PARAM_MAP[rest], get(key), key)
        elif not routed_experts and (_EXPERT_RE.match(rest) or _FUSED_RE.match(rest)):
            continue  # never read: held by remote expert shards
        elif em := _EXPERT_RE.match(rest):
            e, proj = int(em.group(1)), em.group(2)
            experts_pending.setdefault(prefix + "mlp.experts." + proj, {})[e] = get(key)
        elif fm := _FUSED_RE.match(rest):
            t = get(key)
            if fm.group(1) == "gate_up_proj":  # [E, 2I, D]
                g, u = t.chunk(2, dim=1)
                put(prefix + "mlp.experts.gate_proj", g.transpose(1, 2), key)
                put(prefix + "mlp.experts.up_proj", u.transpose(1, 2), key)
            else:  # [E, D, I]
                put(prefix + "mlp.experts.down_proj", t.transpose(1, 2), key)
        else:
            raise CheckpointError(f"unknown tensor {key!r} in checkpoint")

    E = cfg.n_routed_experts
    for our, per_expert in experts_pending.items():
        absent = [e for e in range(E) if e not in per_expert]
        if absent:
            raise CheckpointError(f"missing tensors for {our} experts {absent[:8]}{'...' if len(absent) > 8 else ''}")
        stacked = torch.stack([per_expert[e].t() for e in range(E)])
        put(our, stacked, f"{our} (experts 0..{E - 1})")

    skipped = [] if routed_experts else [k for k in ours if ".mlp.experts." in k]
    missing = [k for k in ours if k not in filled and k not in skipped]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:5]} (HF names: see raymoe.model.hf._PARAM_MAP)")
    for key, t, our in shared_copies:
        if not torch.equal(t.to(dtype), filled[our]):
            log.warning("%s differs from the main model's %s; raymoe shares one copy and keeps the main one", key, our)

    model = DeepSeekV3(cfg, device="meta")
    if not routed_experts:
        from raymoe.model.moe import AbsentExperts, MoE

        for mod in model.modules():
            if isinstance(mod, MoE):
                mod.experts = AbsentExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, dtype)
    model.load_state_dict(filled, strict=True, assign=True)
    model.rotary = type(model.rotary)(cfg)  # rebuild non-persistent buffers off the meta device
    return model.eval()


# ---------------------------------------------------------------------- reading into a built (partial) model
def read_config(path: str | pathlib.Path) -> tuple[dict[str, Any], ModelConfig]:
    """``(config.json as a dict, its ModelConfig)`` of a HF checkpoint directory (MTP depth as the config says)."""
    cfg_file = pathlib.Path(path) / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} has no config.json")
    hf_cfg = load_object(cfg_file.read_bytes(), str(cfg_file), CheckpointError)
    return hf_cfg, config_from_hf(hf_cfg)


def _tensor_names(path: pathlib.Path) -> list[str]:
    names: list[str] = []
    for f in _tensor_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as h:
                names += list(h.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {f.name}: {e}") from e
    return names


def mtp_depth_present(path: str | pathlib.Path, num_hidden_layers: int) -> int:
    """How many MTP depths the checkpoint's tensors hold (layers ``N, N+1, ...`` that have tensors; transformers'
    own ``save_pretrained`` writes none even when its config says ``num_nextn_predict_layers: 1``)."""
    present = {int(m.group(1)) - num_hidden_layers for k in _tensor_names(pathlib.Path(path))
               if (m := _LAYER_RE.match(k)) and int(m.group(1)) >= num_hidden_layers}
    depth = 0
    while depth in present:
        depth += 1
    return depth


def _our_name(key: str, N: int) -> tuple[Optional[str], str, int]:
    """``(our name, kind, expert)`` of a HF tensor name: kind ``copy`` | ``expert`` (one expert's Linear, out×in) |
    ``gate_up`` / ``down`` (transformers 5 fused ``[E, ...]``) | ``shared`` (an MTP layer's copy of a shared tensor)
    | ``scale`` (FP8 block scales, read with their weight). Raises :class:`CheckpointError` for an unknown name."""
    if key.endswith("weight_scale_inv"):
        return None, "scale", -1
    if key in _TOP:
        return _TOP[key], "copy", -1
    m = _LAYER_RE.match(key)
    if not m:
        raise CheckpointError(f"unknown tensor {key!r} in checkpoint")
    idx, rest = int(m.group(1)), m.group(2)
    prefix = f"layers.{idx}."
    if idx >= N:
        prefix = f"mtp.{idx - N}."
        if rest in _MTP_OWN:
            return prefix + _MTP_OWN[rest], "copy", -1
        if rest in _MTP_SHARED:
            return _MTP_SHARED[rest], "shared", -1
        prefix += "block."
    if rest in _PARAM_MAP:
        return prefix + _PARAM_MAP[rest], "copy", -1
    if em := _EXPERT_RE.match(rest):
        return f"{prefix}mlp.experts.{em.group(2)}", "expert", int(em.group(1))
    if fm := _FUSED_RE.match(rest):
        return (prefix + "mlp.experts.gate_proj", "gate_up", -1) if fm.group(1) == "gate_up_proj" else \
            (prefix + "mlp.experts.down_proj", "down", -1)
    raise CheckpointError(f"unknown tensor {key!r} in checkpoint")


@torch.no_grad()
def load_into(model: torch.nn.Module, path: str | pathlib.Path, fresh_mtp: bool = False) -> list[str]:
    """Copy a HF DeepseekV3 checkpoint's tensors into an already built model that may hold only part of them.

    ``model`` is a :class:`DeepSeekV3` (its ``config``), possibly pruned to one pipeline rank's layers and with its
    routed experts sharded (a module with ``expert_ids`` holds rows ``expert_ids`` of ``[E, ...]``): every tensor
    the model holds, under its full-model name, is read — lazily, so a tensor of another rank's layers or experts is
    never read — and copied in place (cast to the model's dtype; FP8 weights dequantised). Router biases
    (``e_score_correction_bias``) land in ``expert_bias``. Tensors of layers the model does not hold are skipped.

    Args:
        model: the (partial) model; its config must be the checkpoint's (:func:`read_config`).
        path: checkpoint directory (``config.json`` + ``*.safetensors``).
        fresh_mtp: MTP depths the checkpoint has no tensors for keep the model's own (fresh) initialisation
            instead of being an error.
    Returns:
        the names of the model's tensors that kept their initialisation (MTP only, with ``fresh_mtp``).
    """
    path = pathlib.Path(path)
    hf_cfg, _ = read_config(path)
    cfg = model.config
    N = cfg.num_hidden_layers
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", (128, 128)))
    loaders = dict(_iter_tensors(_tensor_files(path)))
    targets = dict(model.state_dict(keep_vars=True))
    rows = {f"{mname}.{p}": list(m.expert_ids) for mname, m in model.named_modules()
            if getattr(m, "expert_ids", None) is not None for p, _ in m.named_parameters(recurse=False)}
    filled: set[str] = set()
    pending: dict[str, dict[int, torch.Tensor]] = {}

    def get(key: str) -> torch.Tensor:
        t = loaders[key]()
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_key = key[: -len("weight")] + "weight_scale_inv"
            if scale_key not in loaders:
                raise CheckpointError(f"{key!r} is FP8 but {scale_key!r} (its block scales) is missing")
            t = _dequant_fp8(t, loaders[scale_key](), key, block)
        return t

    def put(our: str, t: torch.Tensor, src: str) -> None:
        ref = targets[our]
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"shape mismatch for {src!r}: checkpoint {tuple(t.shape)}, model {our!r} expects "
                                  f"{tuple(ref.shape)}")
        ref.data.copy_(t)
        filled.add(our)

    for key in sorted(loaders):
        our, kind, e = _our_name(key, N)
        if kind in ("scale", "shared") or our is None:
            continue
        if our not in targets:
            continue  # another rank's layer or module (pruned here), or an MTP depth this model does not train
        if kind == "copy":
            put(our, get(key), key)
        elif kind == "expert":
            ids = rows.get(our, list(range(cfg.n_routed_experts)))
            if e in ids:
                pending.setdefault(our, {})[ids.index(e)] = get(key).t()
        else:  # fused [E, 2I, D] / [E, D, I]: this rank's rows only
            ids = rows.get(our, list(range(cfg.n_routed_experts)))
            t = get(key)[ids]
            if kind == "gate_up":
                g, u = t.chunk(2, dim=1)
                put(our, g.transpose(1, 2), key)
                put(our.replace("gate_proj", "up_proj"), u.transpose(1, 2), key)
            else:
                put(our, t.transpose(1, 2), key)
    for our, per_expert in pending.items():
        n = targets[our].shape[0]
        absent = [rows.get(our, list(range(n)))[i] for i in range(n) if i not in per_expert]
        if absent:
            raise CheckpointError(f"checkpoint lacks tensors for {our} experts {absent[:8]}")
        put(our, torch.stack([per_expert[i] for i in range(n)]), f"{our} (experts {rows.get(our, [0])[0]}..)")
    missing = [k for k in targets if k not in filled]
    kept = [k for k in missing if fresh_mtp and k.startswith("mtp.")]
    missing = [k for k in missing if k not in kept]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {len(missing)} tensors the model needs, e.g. "
                              f"{missing[:5]} (HF names: see raymoe.model.hf._PARAM_MAP)")
    return kept


def expert_biases(path: str | pathlib.Path, cfg: ModelConfig) -> torch.Tensor:
    """``[num_router_layers, E]`` fp32 router biases (``e_score_correction_bias``) of a HF checkpoint, rows in
    :meth:`DeepSeekV3.routers` order (main MoE layers, then the MTP blocks); zeros where the checkpoint has none."""
    path = pathlib.Path(path)
    loaders = dict(_iter_tensors(_tensor_files(path)))
    N = cfg.num_hidden_layers
    layers = [i for i in range(N) if i >= cfg.first_k_dense_replace] + [N + k for k in
                                                                        range(cfg.num_nextn_predict_layers)]
    out = torch.zeros(len(layers), cfg.n_routed_experts, dtype=torch.float32)
    for row, i in enumerate(layers):
        key = f"model.layers.{i}.mlp.gate.e_score_correction_bias"
        if key in loaders:
            t = loaders[key]()
            if tuple(t.shape) != (cfg.n_routed_experts,):
                raise CheckpointError(f"{key} has shape {tuple(t.shape)}, expected ({cfg.n_routed_experts},)")
            out[row] = t.float()
    return out


# ---------------------------------------------------------------------- writing
def to_hf_state_dict(model: DeepSeekV3) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the released HF layout (per-expert Linear weights, MTP at layer N+k-1)."""
    cfg = model.config
    sd = model.state_dict()
    inv = {v: k for k, v in _PARAM_MAP.items()}
    out: dict[str, torch.Tensor] = {hf: sd[our] for hf, our in _TOP.items()}
    N = cfg.num_hidden_layers

    def emit_block(our_prefix: str, hf_prefix: str) -> None:
        for key, t in sd.items():
            if not key.startswith(our_prefix):
                continue
            rest = key[len(our_prefix):]
            if rest in inv:
                out[hf_prefix + inv[rest]] = t
            elif rest.startswith("mlp.experts."):
                proj = rest.split(".")[-1]
                for e in range(t.shape[0]):
                    out[f"{hf_prefix}mlp.experts.{e}.{proj}.weight"] = t[e].t()

    for i in range(N):
        emit_block(f"layers.{i}.", f"model.layers.{i}.")
    for k in range(cfg.num_nextn_predict_layers):
        hf_prefix = f"model.layers.{N + k}."
        emit_block(f"mtp.{k}.block.", hf_prefix)
        for hf, our in _MTP_OWN.items():
            out[hf_prefix + hf] = sd[f"mtp.{k}.{our}"]
        for hf, our in _MTP_SHARED.items():
            out[hf_prefix + hf] = sd[our]
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def save(model: DeepSeekV3, path: str | pathlib.Path, max_shard_bytes: int = 2 * 1024**3) -> pathlib.Path:
    """Write ``config.json`` + safetensors (sharded with an index when larger than ``max_shard_bytes``)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = tensors[k]
        size += nbytes
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2))
    return path
