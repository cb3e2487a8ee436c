"""HF DeepseekV3 checkpoint parity: transformers → raymoe → transformers, and clear errors for bad checkpoints."""
from __future__ import annotations

import json
import pathlib
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from raymoe.config import ModelConfig
from raymoe.model import DeepSeekV3
from raymoe.model import hf

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")


def _hf_config(q_lora, yarn: bool, mtp_layers: int = 1):
    rope = (
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        if yarn
        else None
    )
    return transformers.DeepseekV3Config(
        vocab_size=1000, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, q_lora_rank=q_lora, kv_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, rope_parameters=rope, max_position_embeddings=256,
        num_mtp_layers=mtp_layers,
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory) -> pathlib.Path:
    torch.manual_seed(0)
    m = transformers.DeepseekV3ForCausalLM(_hf_config(64, yarn=True)).eval()
    with torch.no_grad():
        for layer in m.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    m.save_pretrained(path)
    return path


@pytest.mark.parametrize("q_lora, yarn", [(64, True), (64, False), (None, True)])
def test_hf_to_raymoe_to_hf_logits(tmp_path, q_lora, yarn) -> None:
    torch.manual_seed(0)
    ref = transformers.DeepseekV3ForCausalLM(_hf_config(q_lora, yarn)).eval()
    with torch.no_grad():
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf")
    assert ours.config.num_nextn_predict_layers == 0  # transformers writes no MTP tensors
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        a, b = ref(x).logits, ours(x).logits
    assert _rel(a, b) <= 1e-5
    hf.save(ours, tmp_path / "export")
    back = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        c = back(x).logits
    assert _rel(b, c) <= 1e-5
    bias_hf = ref.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(ours.layers[1].mlp.router.expert_bias, bias_hf)


def test_raymoe_roundtrip_with_mtp_and_shards(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny")
    m = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for r in m.routers():
            r.expert_bias.normal_(0, 0.1)
    hf.save(m, tmp_path / "ck", max_shard_bytes=2 * 1024**2)
    assert (tmp_path / "ck" / "model.safetensors.index.json").exists()
    shard_keys = set()
    for f in (tmp_path / "ck").glob("*.safetensors"):
        shard_keys |= set(load_file(f))
    N = cfg.num_hidden_layers
    assert f"model.layers.{N}.eh_proj.weight" in shard_keys
    assert f"model.layers.{N}.mlp.gate.e_score_correction_bias" in shard_keys
    assert f"model.layers.{N}.shared_head.head.weight" in shard_keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in shard_keys
    back = hf.load(tmp_path / "ck")
    assert back.config.num_nextn_predict_layers == 1
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        o1, o2 = m(x, labels=x), back(x, labels=x)
    assert torch.equal(o1.logits, o2.logits) and torch.equal(o1.mtp_logits[0], o2.mtp_logits[0])
    assert torch.equal(m.expert_biases(), back.expert_biases())


def test_errors_name_the_tensor(hf_ckpt, tmp_path) -> None:
    import shutil

    def clone(name: str) -> pathlib.Path:
        dst = tmp_path / name
        shutil.copytree(hf_ckpt, dst)
        return dst

    def rewrite(path: pathlib.Path, fn) -> None:
        f = path / "model.safetensors"
        sd = load_file(f)
        fn(sd)
        save_file(sd, f, metadata={"format": "pt"})

    p = clone("unknown")
    rewrite(p, lambda sd: sd.__setitem__("model.layers.1.mlp.mystery.weight", torch.zeros(2)))
    with pytest.raises(hf.CheckpointError, match="model.layers.1.mlp.mystery.weight"):
        hf.load(p)

    p = clone("missing")
    rewrite(p, lambda sd: sd.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(hf.CheckpointError, match="layers.2.self_attn.kv_b_proj.weight"):
        hf.load(p)

    p = clone("shape")
    rewrite(p, lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(3, 3)))
    with pytest.raises(hf.CheckpointError, match=r"shape mismatch for 'model.layers.0.self_attn.o_proj.weight'"):
        hf.load(p)

    p = clone("expert")
    rewrite(p, lambda sd: sd.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(hf.CheckpointError, match=r"experts \[3\]"):
        hf.load(p)

    p = clone("llama")
    cfg = json.loads((p / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match="not a DeepseekV3 checkpoint"):
        hf.load(p)

    p = tmp_path / "pickled"
    p.mkdir()
    (p / "config.json").write_text((hf_ckpt / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, p / "pytorch_model.bin")
    with pytest.raises(hf.CheckpointError, match="never unpickles"):
        hf.load(p)

    p = clone("corrupt")
    (p / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(hf.CheckpointError, match="cannot read model.safetensors"):
        hf.load(p)


def test_fp8_block_scaled_weights_are_dequantised(hf_ckpt, tmp_path) -> None:
    import shutil

    p = tmp_path / "fp8"
    shutil.copytree(hf_ckpt, p)
    f = p / "model.safetensors"
    sd = load_file(f)
    key = "model.layers.0.self_attn.q_b_proj.weight"  # [4*48=192, 64]: two row blocks, one column block
    w = sd[key]
    scale = torch.stack([w[:128].abs().max(), w[128:].abs().max()]).view(2, 1) / 448.0
    q = (w / scale.repeat_interleave(128, 0)[: w.shape[0]]).to(torch.float8_e4m3fn)
    sd[key] = q
    sd[key + "_scale_inv"] = scale
    save_file(sd, f, metadata={"format": "pt"})
    m = hf.load(p)
    got = m.layers[0].self_attn.q_b_proj.weight
    assert (got - w).abs().max() / w.abs().max() < 0.07  # e4m3 has a 3-bit mantissa
    assert not torch.equal(got, w)


def _grel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Like ``_rel`` but 0 for two all-zero gradients (an expert no token was routed to)."""
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("impl", ["grouped_mm", "padded", "loop", "bmm"])
def test_gradients_match_transformers(tmp_path, impl) -> None:
    """Our hand-written backward passes (experts, dispatch/combine, RMSNorm, cross-entropy, attention) against
    transformers' plain autograd on the same weights and batch: every parameter gradient agrees (fp32)."""
    import copy

    torch.manual_seed(1)
    ref = transformers.DeepseekV3ForCausalLM(_hf_config(64, yarn=True, mtp_layers=0)).train()
    with torch.no_grad():
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    ref.save_pretrained(tmp_path / "hf")
    ours = hf.load(tmp_path / "hf").train()
    from raymoe.model.moe import set_expert_impl

    set_expert_impl(ours, impl)
    x = torch.randint(0, 1000, (2, 48))
    y = torch.roll(x, -1, 1)
    y[0, :5] = -100  # ignored labels go through both losses the same way
    ours(x, labels=y).loss.backward()
    logits = ref(x).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100).backward()

    grads = copy.deepcopy(ours)
    for p, q in zip(grads.parameters(), ours.parameters()):
        assert q.grad is not None, "a parameter got no gradient"
        p.data = q.grad
    ours_g = hf.to_hf_state_dict(grads)
    checked = 0
    for name, p in ref.named_parameters():
        g = p.grad
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, D] fused in transformers; ours per expert [I, D]
            pre, inter = name[: -len("gate_up_proj")], g.shape[1] // 2
            for e in range(g.shape[0]):
                assert _grel(g[e, :inter], ours_g[f"{pre}{e}.gate_proj.weight"]) < 1e-4, (name, e)
                assert _grel(g[e, inter:], ours_g[f"{pre}{e}.up_proj.weight"]) < 1e-4, (name, e)
        elif name.endswith("experts.down_proj"):
            pre = name[: -len("down_proj")]
            for e in range(g.shape[0]):
                assert _grel(g[e], ours_g[f"{pre}{e}.down_proj.weight"]) < 1e-4, (name, e)
        else:
            assert _grel(g, ours_g[name]) < 1e-4, name
        checked += 1
    assert checked == len(list(ref.parameters()))
