"""`JetNemotronConfig` reads the official files and rejects malformed ones by field."""

import copy
import json

import pytest

from vllm_jetnemotron.config import JetNemotronConfig, checkpoint_tensor_shapes
from vllm_jetnemotron.converter.random_checkpoint import asset_path, official_config


def official_dict(name: str) -> dict:
    return json.loads(asset_path(f"jet-nemotron-{name}.config.json").read_text())


@pytest.mark.parametrize("name, layers, heads, k, v, window", [
    ("2b", 28, 12, 96, 256, 1152),
    ("4b", 36, 16, 128, 256, 2048),
])
def test_official_configs_load(name, layers, heads, k, v, window):
    config = official_config(name)
    d = config.jet_dims
    assert (config.num_hidden_layers, d.num_heads, d.head_k_dim, d.head_v_dim) == (layers, heads, k, v)
    assert config.sliding_window_size == window
    assert d.norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 1e6


def test_save_and_reload_keeps_official_schema(tmp_path):
    config = official_config("2b")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    original = official_dict("2b")
    for field in ("layer_types", "efficient_attention_config", "rope_theta", "rope_scaling",
                  "hidden_size", "num_key_value_heads", "tie_word_embeddings", "model_type"):
        assert saved[field] == original[field], field
    assert "rope_parameters" not in saved
    assert JetNemotronConfig.from_pretrained(tmp_path).layer_types == config.layer_types


def test_state_bytes_at_64k_match_the_paper():
    # Paper: 154 MB of cache at 64K context for Jet-Nemotron-2B (bf16).
    assert official_config("2b").state_bytes_per_sequence(65536) / 1e6 == pytest.approx(154, rel=0.03)


def broken(name="2b", **changes):
    d = copy.deepcopy(official_dict(name))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = d
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return d


DELETE = object()


@pytest.mark.parametrize("changes, message", [
    ({"layer_types": ["jet"] * 27 + ["mamba"]}, r"layer_types\[27\] is 'mamba'"),
    ({"layer_types": ["jet"] * 27}, "layer_types has 27 entries but num_hidden_layers is 28"),
    ({"efficient_attention_config__swa": DELETE}, "efficient_attention_config.swa is missing"),
    ({"efficient_attention_config__jet": DELETE}, "efficient_attention_config.jet is missing"),
    ({"efficient_attention_config__jet__expand_v": "two"}, "jet.expand_v must be a number, got 'two'"),
    ({"efficient_attention_config__jet__expand_v": 2.3}, "not an integer"),
    ({"num_attention_heads": 7}, r"num_attention_heads \(7\) must divide hidden_size \(1536\)"),
    ({"num_key_value_heads": 5}, r"num_key_value_heads \(5\) must divide num_attention_heads"),
    ({"efficient_attention_config__jet__num_heads": 0}, "efficient_attention_config.jet.num_heads must be a positive integer"),
    ({"efficient_attention_config__swa__window_size": -4}, "swa.window_size must be a positive integer"),
    ({"hidden_size": "256"}, r"hidden_size must be of type int, got '256' \(str\)"),
    ({"num_hidden_layers": 28.0}, r"num_hidden_layers must be of type int, got 28.0 \(float\)"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be of type bool, got 'yes'"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be of type float, got 'small'"),
    ({"vocab_size": True}, "vocab_size must be of type int, got True"),
    ({"layer_types": ["jet"] * 27 + [3]}, r"layer_types must be of type list\[str\] \| None, got \["),
    ({"efficient_attention_config": "jet"}, r"efficient_attention_config must be of type dict \| None"),
])
def test_malformed_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        JetNemotronConfig(**broken(**changes))


def test_expand_v_must_give_integer_value_dim():
    with pytest.raises(ValueError, match=r"head_dim \* expand_v = 220.8, which is not an integer"):
        JetNemotronConfig(**broken(efficient_attention_config__jet__expand_v=2.3))


def test_checkpoint_shapes_cover_both_mixer_kinds():
    shapes = checkpoint_tensor_shapes(official_config("2b"))
    assert shapes["model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w2.weight"] == (3072 * 4, 384)
    assert shapes["model.layers.14.self_attn.q_proj.bias"] == (1536,)
    assert "lm_head.weight" not in shapes  # tied embeddings


@pytest.mark.parametrize("name", ["2b", "4b"])
def test_checkpoint_tensor_shapes_equal_the_official_weight_map(name):
    # The asset is derived from NVlabs' own modeling code (its "source" field says how),
    # so this checks checkpoint_tensor_shapes against something this project did not write.
    asset = json.loads(asset_path(f"jet-nemotron-{name}.tensors.json").read_text())
    official = {tensor: tuple(dims) for tensor, dims in asset["tensors"].items()}
    ours = checkpoint_tensor_shapes(official_config(name))
    missing = sorted(official.keys() - ours.keys())
    extra = sorted(ours.keys() - official.keys())
    differing = {t: (ours[t], official[t]) for t in sorted(official.keys() & ours.keys())
                 if ours[t] != official[t]}
    assert not (missing or extra or differing), (
        f"checkpoint_tensor_shapes({name}) disagrees with the official tensor list: "
        f"missing {missing}; extra {extra}; shape (ours, official) {differing}")
