"""Golden tests: our model against transformers 5.23's DeepseekV2ForCausalLM, in fp32."""

import json

import pytest
import torch
import transformers

from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.checkpoint import INDEX_FILE

from .reference import CONFIG_B, CONFIGS, hf_checkpoint

TOLERANCE = 1e-5


@pytest.fixture(params=sorted(CONFIGS))
def config(request) -> DeepseekV2Config:
    return CONFIGS[request.param]


def token_batch(config: DeepseekV2Config, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers_checkpoint(config, tmp_path):
    reference = hf_checkpoint(config, tmp_path)
    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    ids = token_batch(config)
    expected = reference(ids).logits
    got = ours(ids).logits
    assert got.shape == (2, 24, config.vocab_size)
    assert expected.abs().max() > 1.0  # the comparison below is not between near-zero logits
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_transformers_reloads_our_checkpoint(config, tmp_path):
    ours = DeepseekV2ForCausalLM(config).init_weights(seed=3)
    ours.save_pretrained(tmp_path)
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = token_batch(config)
    torch.testing.assert_close(reference(ids).logits, ours(ids).logits, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_legacy_config_json_loads_with_same_logits(tmp_path):
    reference = hf_checkpoint(CONFIG_B, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    rope = saved.pop("rope_parameters")
    for key in ("head_dim", "qk_head_dim"):
        saved.pop(key)
    saved["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    saved["rope_scaling"] = rope
    saved.update(
        auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, seq_aux=True, ep_size=1, torch_dtype="float32"
    )
    (tmp_path / "config.json").write_text(json.dumps(saved))

    ours = DeepseekV2ForCausalLM.from_pretrained(tmp_path)
    assert ours.config.rope_scaling.type == "yarn" and ours.config.rope_scaling.factor == 40.0
    assert ours.config.softmax_scale == pytest.approx(24**-0.5 * (0.1 * 0.707 * torch.log(torch.tensor(40.0)).item() + 1) ** 2)
    ids = token_batch(CONFIG_B)
    torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=TOLERANCE, rtol=0)

    # Unknown keys survive a save, and transformers reads what we write.
    ours.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert resaved["auto_map"] == saved["auto_map"] and resaved["seq_aux"] is True
    assert resaved["rope_parameters"]["rope_type"] == "yarn"
    reloaded = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "resaved").eval()
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=TOLERANCE, rtol=0)


def test_v2_lite_style_legacy_config_parses():
    legacy = {
        "architectures": ["DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "topk_method": "gready",
        "n_group": 1,
        "topk_group": 1,
        "n_routed_experts": 64,
        "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        "some_future_key": [1, 2],
    }
    config = DeepseekV2Config.model_validate(legacy)
    assert config.q_lora_rank is None and not config.group_limited
    assert config.softmax_scale == pytest.approx(0.1147214, abs=1e-7)  # SPEC §1.3, V2 and Lite
    assert config.to_hf_dict()["some_future_key"] == [1, 2]
    assert config.to_hf_dict()["topk_method"] == "gready"


@torch.no_grad()
def test_sharded_and_partial_loading(tmp_path):
    ours = DeepseekV2ForCausalLM(CONFIG_B).init_weights(seed=5)
    ours.save_pretrained(tmp_path, max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = token_batch(CONFIG_B)
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reference(ids).logits, ours(ids).logits, atol=TOLERANCE, rtol=0)

    # A process holding experts 2 and 5 reads only those of the routed experts.
    partial = DeepseekV2ForCausalLM.from_pretrained(tmp_path, expert_ids=[2, 5])
    routed = {name.split(".experts.")[1].split(".")[0] for name in partial.state_dict() if ".experts." in name}
    assert routed == {"2", "5"}
    full = ours.state_dict()
    for name, tensor in partial.state_dict().items():
        assert torch.equal(tensor, full[name]), name


@torch.no_grad()
def test_bf16_round_trip(tmp_path):
    ours = DeepseekV2ForCausalLM(CONFIG_B).init_weights(seed=6).to(torch.bfloat16)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ours.state_dict()[name]), name
    ids = token_batch(CONFIG_B)
    reference = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    logits = reloaded(ids).logits.float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference(ids).logits.float(), atol=0.1, rtol=0.05)
