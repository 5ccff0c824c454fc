"""`jet-nemotron-convert quantize`: compressed-tensors checkpoints of a random
Jet-Nemotron model, checked against compressed-tensors itself (its presets, its
model-free dequantizer) and the reference model; no vLLM engine."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_jetnemotron.converter import cli
from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
from vllm_jetnemotron.converter.quantize import dequantized_state_dict, quantize_checkpoint
from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

# Every in-feature count (256, 512 and the kernel generator's 128) is a multiple of 128.
CONFIG = dict(
    vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
    layer_types=["jet", "attn", "swa"],
    efficient_attention_config={
        "jet": {"num_heads": 4, "head_dim": 64, "expand_v": 2.0, "conv_size": 4,
                "dconv_generator_reduction": 4, "norm_eps": "1e-5"},
        "swa": {"window_size": 64}})
JET_LINEARS = ("q_proj", "k_proj", "v_proj", "g_proj", "o_proj",  # b_proj, a_proj stay unquantized
               "dynamic_conv1d.kernel_generator.w1", "dynamic_conv1d.kernel_generator.w2")
ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
PRESETS = {"w8a8": "W8A8", "w4a16": "W4A16"}
Q_MAX = {"w8a8": 127, "w4a16": 7}


def quantized_linears(config) -> list[str]:
    names = []
    for i, kind in enumerate(config["layer_types"]):
        names += [f"model.layers.{i}.self_attn.{n}" for n in (JET_LINEARS if kind == "jet" else ATTN_LINEARS)]
        names += [f"model.layers.{i}.mlp.{n}" for n in MLP_LINEARS]
    return names


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quantize") / "source"
    return write_random_checkpoint(path, preset_config("small", **CONFIG), seed=0, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def quantized(checkpoint) -> dict[str, Path]:
    """Each scheme through the command line (`jet-nemotron-convert quantize`)."""
    out = {}
    for scheme in PRESETS:
        out[scheme] = checkpoint.parent / scheme
        assert cli.main(["quantize", str(checkpoint), str(out[scheme]), "--scheme", scheme]) == 0
    return out


@pytest.mark.parametrize("scheme", PRESETS)
def test_config_is_the_compressed_tensors_preset(checkpoint, quantized, scheme):
    source = json.loads((checkpoint / "config.json").read_text())
    written = json.loads((quantized[scheme] / "config.json").read_text())
    qc = written.pop("quantization_config")
    assert written == source
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == {"w8a8": "int-quantized", "w4a16": "pack-quantized"}[scheme]
    assert qc["quantization_status"] == "compressed"
    gates = [f"model.layers.{i}.self_attn.{n}" for i, kind in enumerate(CONFIG["layer_types"]) if kind == "jet"
             for n in ("b_proj", "a_proj")]
    assert sorted(qc["ignore"]) == sorted(["lm_head", *gates])  # as compressed-tensors lists them
    parsed = QuantizationConfig.model_validate(qc)
    group = parsed.config_groups["group_0"]
    preset = preset_name_to_scheme(PRESETS[scheme], ["Linear"])
    assert list(parsed.config_groups) == ["group_0"]
    assert group.targets == ["Linear"]
    assert group.weights == preset.weights
    assert group.input_activations == preset.input_activations
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json"):
        if (checkpoint / name).exists():
            assert (quantized[scheme] / name).read_bytes() == (checkpoint / name).read_bytes(), name


@pytest.mark.parametrize("scheme", PRESETS)
def test_tensor_names_dtypes_and_shapes(checkpoint, quantized, scheme):
    """Decoder Linears quantized under their official names; every other tensor as it was."""
    source, written = read_tensors(checkpoint), read_tensors(quantized[scheme])
    linears = quantized_linears(CONFIG)
    unquantized = set(source) - {f"{n}.weight" for n in linears}
    expected = set(unquantized)
    for name in linears:
        out_features, in_features = source[f"{name}.weight"].shape
        if scheme == "w8a8":
            assert written[f"{name}.weight"].dtype == torch.int8
            assert written[f"{name}.weight"].shape == (out_features, in_features)
            assert written[f"{name}.weight_scale"].shape == (out_features, 1)
            expected |= {f"{name}.weight", f"{name}.weight_scale"}
        else:
            assert written[f"{name}.weight_packed"].dtype == torch.int32
            assert written[f"{name}.weight_packed"].shape == (out_features, in_features // 8)
            assert written[f"{name}.weight_scale"].shape == (out_features, in_features // 128)
            assert written[f"{name}.weight_shape"].tolist() == [out_features, in_features]
            expected |= {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.weight_shape"}
        assert written[f"{name}.weight_scale"].dtype == torch.float32
    assert set(written) == expected
    for name in unquantized:  # embeddings, lm_head, norms, A_log, dt_bias, biases
        assert written[name].dtype == source[name].dtype == torch.bfloat16, name
        assert torch.equal(written[name].view(torch.int16), source[name].view(torch.int16)), name


@pytest.mark.parametrize("scheme", PRESETS)
def test_dequantized_weights_are_round_to_nearest(checkpoint, quantized, scheme):
    """compressed-tensors' own dequantizer gives back each weight within half a step of
    its scale, and each channel/group's largest weight reaches the end of the int range."""
    source, written = read_tensors(checkpoint), read_tensors(quantized[scheme])
    dequantized = dequantized_state_dict(quantized[scheme], dtype=torch.float32)
    assert set(dequantized) == set(source)
    for name in quantized_linears(CONFIG):
        w, dq = source[f"{name}.weight"].float(), dequantized[f"{name}.weight"]
        scale = written[f"{name}.weight_scale"]  # [out_features, groups]
        groups = scale.shape[1]
        scale = scale.repeat_interleave(w.shape[1] // groups, dim=1)
        assert ((w - dq).abs() <= scale / 2 + 4 * torch.finfo(torch.float32).eps * w.abs()).all(), name
        steps = dq / scale
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert (steps.abs().unflatten(1, (groups, -1)).amax(-1).round() >= Q_MAX[scheme]).all(), name
    for name in set(source) - {f"{n}.weight" for n in quantized_linears(CONFIG)}:
        assert torch.equal(dequantized[name], source[name]), name


@pytest.mark.parametrize("scheme, max_error", [("w8a8", 0.05), ("w4a16", 0.5)])
def test_reference_model_runs_on_dequantized_weights(checkpoint, quantized, scheme, max_error):
    model = JetNemotronForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        original = model(ids).logits
        model.load_state_dict(dequantized_state_dict(quantized[scheme], dtype=torch.float32), strict=True)
        logits = model(ids).logits
    assert 0 < ((logits - original).norm() / original.norm()).item() < max_error


def test_group_size_option(checkpoint, tmp_path):
    out = tmp_path / "w4a16-g64"
    assert cli.main(["quantize", str(checkpoint), str(out), "--scheme", "w4a16", "--group-size", "64"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_shape() == [256, 512 // 64]


def test_group_must_divide_in_features(tmp_path):
    """An MLP of 480 (a multiple of the kernels' 32, not of a group of 128): refused, naming
    the first down_proj; nothing written."""
    source = write_random_checkpoint(tmp_path / "source", preset_config("small", **{**CONFIG, "intermediate_size": 480}),
                                     seed=0, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj: in_features 480 is not a "
                                         r"multiple of the group size 128 \(and 2 more layers\)"):
        quantize_checkpoint(source, tmp_path / "out", "w4a16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source"]


def _copy_checkpoint(src: Path, dst: Path, edit_tensors=None) -> None:
    """Checkpoint `src` copied to `dst`, its tensors (a dict) changed by `edit_tensors`."""
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def _diverged(tensors: dict[str, torch.Tensor]) -> None:
    """A NaN in the JetBlock's o_proj and an infinity in the final norm."""
    tensors["model.layers.0.self_attn.o_proj.weight"][3, 5] = float("nan")
    tensors["model.norm.weight"][-1] = float("inf")


@pytest.mark.parametrize("case, message", [
    ("unknown_scheme", "unknown scheme 'w3a16'; expected one of w8a8, w4a16"),
    ("group_size_w8a8", "--group-size applies to grouped schemes (w4a16), not w8a8"),
    ("group_size_cpu_only", "--group-size 96: vLLM's CUDA kernel for 4-bit weights (Marlin) takes groups of "
                            "32, 64 or 128 input features"),
    ("missing_folder", "does not exist"),
    ("no_config", "is not a Jet-Nemotron checkpoint: no config.json"),
    ("other_model", "has model_type 'qwen2', expected 'jet_nemotron'"),
    ("bad_config", "config.json: hidden_size must be of type int, got '256'"),
    ("missing_tensor", "missing keys: model.layers.1.mlp.down_proj.weight"),
    ("truncated", "bad/model.safetensors is truncated or not a safetensors file: Error while deserializing "
                  "header: incomplete metadata, file not fully covered"),
    ("non_finite", "bad: NaN or infinite values in 2 tensor(s): model.layers.0.self_attn.o_proj.weight, "
                   "model.norm.weight; was it written by a training run that diverged?"),
    ("already_quantized", "is already quantized"),
    ("existing_out", "already exists; remove it or choose a new folder"),
])
def test_bad_input_stops_with_a_message(checkpoint, quantized, tmp_path, capsys, case, message):
    """Exit status 2 and one line naming the problem; nothing written."""
    src, out, extra = checkpoint, tmp_path / "out", []
    scheme = {"unknown_scheme": "w3a16", "group_size_cpu_only": "w4a16"}.get(case, "w8a8")
    if case == "group_size_w8a8":
        extra = ["--group-size", "64"]
    elif case == "group_size_cpu_only":
        extra = ["--group-size", "96"]
    elif case == "missing_folder":
        src = tmp_path / "nowhere"
    elif case in ("no_config", "other_model", "bad_config"):
        src = tmp_path / "bad"
        src.mkdir()
        if case != "no_config":
            config = json.loads((checkpoint / "config.json").read_text())
            config.update(model_type="qwen2") if case == "other_model" else config.update(hidden_size="256")
            (src / "config.json").write_text(json.dumps(config))
    elif case == "missing_tensor":
        src = tmp_path / "bad"
        _copy_checkpoint(checkpoint, src, lambda tensors: tensors.pop("model.layers.1.mlp.down_proj.weight"))
    elif case == "truncated":
        src = tmp_path / "bad"
        _copy_checkpoint(checkpoint, src)
        weights = src / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    elif case == "non_finite":
        src = tmp_path / "bad"
        _copy_checkpoint(checkpoint, src, _diverged)
    elif case == "already_quantized":
        src = quantized["w8a8"]
    elif case == "existing_out":
        out.mkdir()
    before = set(tmp_path.iterdir())
    code = cli.main(["quantize", str(src), str(out), "--scheme", scheme, *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("jet-nemotron-convert quantize: error: ") and message in last, err
    assert "Traceback" not in err
    if case not in ("missing_tensor", "non_finite"):  # transformers prints its loading output first
        assert err.strip() == last
    assert set(tmp_path.iterdir()) == before  # no OUT, no temporary folder


def test_module_entry_point_and_recipe_dispatch(tmp_path, capsys):
    result = subprocess.run(
        [sys.executable, "-m", "vllm_jetnemotron.converter", "quantize", str(tmp_path), str(tmp_path / "out"),
         "--scheme", "fp3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("jet-nemotron-convert quantize: error: unknown scheme 'fp3'; "
                                     "expected one of w8a8, w4a16")
    assert cli.main([str(tmp_path / "recipe.yaml")]) == 2  # anything but `quantize` is still a recipe
    assert "recipe.yaml" in capsys.readouterr().err
