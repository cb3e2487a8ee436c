"""Untrusted or invalid inputs fail at once with an error naming what is wrong (no spinning loop, no path escape)."""
from __future__ import annotations

import json
import shutil

import pytest

from raymoe.engine import EngineConfig
from raymoe.model import hf


@pytest.mark.parametrize("key, value", [("max_num_seqs", 0), ("num_blocks", -1), ("block_size", 0),
                                        ("max_num_batched_tokens", 0), ("prefill_chunk", 1.5),
                                        ("num_speculative_tokens", -1), ("max_model_len", 1), ("max_waiting", -2)])
def test_engine_config_refuses_values_that_would_hang_the_loop(key: str, value) -> None:
    with pytest.raises(ValueError, match=f"engine.{key} must be"):
        EngineConfig.from_dict({key: value})
    EngineConfig.from_dict({})  # the defaults are valid


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", "..",
                                  "model.bin"])
def test_weight_map_may_only_name_files_of_the_checkpoint(tiny_ckpt, tmp_path, name: str) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    files = sorted(p.name for p in ck.glob("*.safetensors") if p.name != "expert_load.safetensors")
    keys = {}
    from safetensors import safe_open

    for f in files:
        with safe_open(str(ck / f), framework="pt") as h:
            keys.update({k: f for k in h.keys()})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": keys}))
    assert hf.load(ck) is not None  # a clean index loads
    first = next(iter(keys))
    keys[first] = name
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": keys}))
    with pytest.raises(hf.CheckpointError, match="only \\*.safetensors files of this directory"):
        hf.load(ck)
