"""Any training checkpoint → a HF DeepseekV3 export (what ``python -m raymoe.jobs.export`` and the end of a run do).

An export directory holds::

    config.json, model*.safetensors    the weights (raymoe.model.hf.save), router biases = the balancer's
    expert_load.safetensors            the checkpoint's token counts per expert (serving's EPLB seed)
    generation_config.json             eos/pad = the tokenizer's end-of-text id
    tokenizer.json (+ its config files when the run's tokenizer has them)

Every checkpoint carries what the export needs beside the weights under ``hf_extra/`` (the tokenizer files and
``generation_config.json``, :func:`write_extra`), so an export needs nothing but the checkpoint: not the run's data
cache, not the node that trained it. The weights come from either checkpoint format: native sharded safetensors (any
pp/ep/dp layout; :func:`raymoe.train.sharded.assemble_full`) or DeepSpeed engine files (``stage0/engine/
mp_rank_00_model_states.pt``, read with the weights-only loader: nothing is unpickled).

Which checkpoint (:func:`find_checkpoint`): a checkpoint directory / URI is taken as is (it must be valid: manifest
present, complete, sizes — and, locally, hashes — matching); a run directory / storage root (``<it>/checkpoints/``)
gives its newest valid checkpoint, so a run that was interrupted before its final export exports its last saved
step. Downloads from an object store are hash-checked (:func:`raymoe.checkpoint.local_copy`).
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Optional

import torch

from raymoe import checkpoint as ckpt
from raymoe.config import ModelConfig
from raymoe.storage import Storage

__all__ = ["EXTRA_DIR", "TOKENIZER_FILES", "write_extra", "find_checkpoint", "model_config_of", "load_weights",
           "export_checkpoint"]

EXTRA_DIR = "hf_extra"
# tokenizer files copied through when they sit beside the run's tokenizer.json (HF tokenizers ship them together)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
_DS_MODEL_STATES = "stage0/engine/mp_rank_00_model_states.pt"


def write_extra(d: pathlib.Path, data_info: dict[str, Any], model_max_length: Optional[int] = None) -> None:
    """Write the non-weight files of an export into ``d``: ``tokenizer.json`` and

    * a user's HF tokenizer (``data.tokenizer=<dir>``): its own ``tokenizer_config.json`` (special tokens, chat
      template) and companions copied through, ``generation_config.json`` with the data's bos/eos/pad ids;
    * our own BPE (``data.tokenizer=train``): ``tokenizer_config.json`` with the ChatML template and
      ``generation_config.json`` with the end-of-text id (:func:`raymoe.engine.chat.write_tokenizer_files`),

    so transformers' ``AutoTokenizer`` / ``apply_chat_template`` / ``generate`` and our server agree."""
    d.mkdir(parents=True, exist_ok=True)
    tok = data_info.get("tokenizer_path")
    src = pathlib.Path(tok) if tok else None
    if src is not None and src.is_file():
        shutil.copyfile(src, d / "tokenizer.json")
    if src is not None and (src.parent / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES[1:]:
            if (src.parent / name).is_file():
                shutil.copyfile(src.parent / name, d / name)
        gen: dict[str, Any] = {"_from_model_config": False}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # raymoe.data.prepare_data
            if data_info.get(key) is not None:
                gen[key] = int(data_info[key])
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
        return
    from raymoe.engine.chat import write_tokenizer_files

    write_tokenizer_files(d, data_info.get("eod_id"), None, model_max_length)


def find_checkpoint(location: str) -> ckpt.CheckpointRef:
    """The checkpoint to export from ``location``: itself when it is a checkpoint (has ``manifest.json``), else the
    newest valid checkpoint of the run / storage root it names. Raises :class:`raymoe.checkpoint.CheckpointCorrupt`
    (a named checkpoint that is partial or damaged) or ``FileNotFoundError`` (nothing exportable there)."""
    st = Storage(location)
    if st.exists(ckpt.MANIFEST) or location.rstrip("/").rsplit("/", 1)[-1].startswith("step_"):
        return ckpt.CheckpointStore(location).open(location)
    store = ckpt.CheckpointStore(location)
    steps = store.steps()
    ref = store.latest_valid()
    if ref is None:
        what = (f"none of its {len(steps)} checkpoint(s) {[ckpt.step_dir_name(s) for s in steps]} is complete and "
                "intact (see the warnings above)") if steps else "it has no checkpoints/step_* directory"
        raise FileNotFoundError(f"{location}: nothing to export: {what}; give a run directory, a storage root or a "
                                "checkpoint directory")
    return ref


def model_config_of(d: pathlib.Path, where: str) -> ModelConfig:
    """The model config a checkpoint was trained with (its ``config.json``: the run config as plain JSON)."""
    import dataclasses

    try:
        model = json.loads((d / "config.json").read_text())["model"]
        names = {f.name for f in dataclasses.fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in model.items() if k in names})
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ckpt.CheckpointCorrupt(f"{where}: config.json does not describe a raymoe model ({e})") from None


def _biases(d: pathlib.Path, cfg: ModelConfig) -> torch.Tensor:
    from raymoe.train.run_state import load_coordinator_state

    bias = load_coordinator_state(d).get("balancer", {}).get("bias")
    if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cfg.num_router_layers, cfg.n_routed_experts):
        raise ckpt.CheckpointCorrupt(f"{d}: coordinator state holds no [{cfg.num_router_layers}, "
                                     f"{cfg.n_routed_experts}] balancer bias")
    return bias


def load_weights(d: pathlib.Path, files: dict[str, Any], cfg: ModelConfig, where: str) -> torch.nn.Module:
    """The full model of a checkpoint directory ``d`` (either format; module docstring), biases included."""
    from raymoe.model import DeepSeekV3
    from raymoe.train.sharded import SHARD_PREFIX, assemble_full

    if any(f.startswith(SHARD_PREFIX) for f in files):
        model = assemble_full(d, DeepSeekV3(cfg))
    elif _DS_MODEL_STATES in files:
        from raymoe.train.deepspeed_worker import safe_torch_load

        states = safe_torch_load(d / _DS_MODEL_STATES, map_location="cpu")
        sd = states.get("module") if isinstance(states, dict) else None
        if not isinstance(sd, dict):
            raise ckpt.CheckpointCorrupt(f"{where}: {_DS_MODEL_STATES} holds no 'module' state dict")
        model = DeepSeekV3(cfg, device="meta")
        try:
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
        except RuntimeError as e:
            raise ckpt.CheckpointCorrupt(f"{where}: DeepSpeed weights do not fit the model: "
                                         f"{str(e).splitlines()[0]}") from None
        model.rotary = type(model.rotary)(cfg)  # non-persistent buffers off the meta device
    else:
        raise ckpt.CheckpointCorrupt(f"{where}: holds neither shards/*.safetensors nor {_DS_MODEL_STATES}")
    model.set_expert_biases(_biases(d, cfg))
    return model.eval()


def export_checkpoint(ref: ckpt.CheckpointRef, out: str | pathlib.Path) -> pathlib.Path:
    """Write checkpoint ``ref`` as a HF export into the local directory ``out`` (module docstring)."""
    from raymoe.model import hf

    out = pathlib.Path(out)
    with ckpt.local_copy(ref) as d:
        cfg = model_config_of(d, ref.location)
        model = load_weights(d, ref.files, cfg, ref.location)
        hf.save(model, out)
        if (d / "expert_load.safetensors").is_file():
            shutil.copyfile(d / "expert_load.safetensors", out / "expert_load.safetensors")
        extra = [f for f in ref.files if f.startswith(EXTRA_DIR + "/")]
        for rel in extra:
            shutil.copyfile(d / rel, out / rel.split("/", 1)[1])
        if not extra:  # a checkpoint written before hf_extra/ existed: weights and expert load only
            (out / "generation_config.json").write_text(json.dumps({"_from_model_config": False}, indent=2))
    return out
