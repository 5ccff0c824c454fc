"""Loading through the plugin: official 2B/4B configs with dummy weights (shapes and
state sizes), tensor and pipeline parallelism, and clear errors for broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import as_inputs, greedy, random_prompts, reference_greedy, running_llm, start_llm, token_ids
from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
from vllm_jetnemotron.converter.random_checkpoint import (
    copy_tokenizer,
    official_config,
    preset_config,
    write_random_checkpoint,
)


def bound_state_shapes(model) -> list:
    """(dtype, conv shape, recurrent shape) of every JetBlock's cache, per slot."""
    from vllm_jetnemotron.jet_block import JetBlock

    return [(str(m.kv_cache[0].dtype), tuple(m.kv_cache[0].shape[1:]), str(m.kv_cache[1].dtype),
             tuple(m.kv_cache[1].shape[1:])) for m in model.modules() if isinstance(m, JetBlock)]


# One layer of each kind and a second JetBlock: the official layers at their full size, without
# the time and memory of initialising all 28 (2B) or 36 (4B) of them with dummy weights.
FEW_LAYERS = ["jet", "attn", "swa", "jet"]


@pytest.mark.parametrize("name, heads, k, v", [("2b", 12, 96, 256), ("4b", 16, 128, 256)])
def test_official_config_with_dummy_weights(tmp_path, monkeypatch, name, heads, k, v):
    """The official config.json, read as is, with vLLM's `hf_overrides` keeping four of its
    layers: every JetBlock binds state of the official sizes."""
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
    config = official_config(name)
    config.save_pretrained(tmp_path)
    copy_tokenizer(tmp_path)
    with running_llm(str(tmp_path), dtype="bfloat16", load_format="dummy", max_model_len=1024,
                     kv_cache_memory_bytes=1 << 30,
                     hf_overrides={"num_hidden_layers": len(FEW_LAYERS), "layer_types": FEW_LAYERS}) as llm:
        (states,) = llm.apply_model(bound_state_shapes)
        (out,) = llm.generate(as_inputs(random_prompts([9])), greedy(2))
    num_jet = FEW_LAYERS.count("jet")
    d = config.jet_dims
    assert len(states) == num_jet
    for _, conv_shape, _, state_shape in states:  # (shapes come back from the worker as lists)
        assert tuple(conv_shape) == (d.conv_size - 1, heads * v)
        assert tuple(state_shape) == (heads, k, v)
    # Bytes per sequence of JetBlock state, as bound by vLLM, against the analytical value:
    # per jet layer (W - 1) * value_dim conv entries + H * K * V recurrent entries.
    conv_bytes = torch.tensor([], dtype=getattr(torch, states[0][0].split(".")[1])).element_size()
    state_bytes = torch.tensor([], dtype=getattr(torch, states[0][2].split(".")[1])).element_size()
    bound = sum(torch.Size(c).numel() * conv_bytes + torch.Size(s).numel() * state_bytes
                for _, c, _, s in states)
    analytical = num_jet * (3 * heads * v * conv_bytes + heads * k * v * state_bytes)
    assert bound == analytical
    assert len(out.outputs[0].token_ids) == 2


def test_tensor_parallel_matches_single_worker(tiny_checkpoint, default_llm, monkeypatch):
    prompts = random_prompts([7, 130, 60], seed=5)
    single = token_ids(default_llm.generate(as_inputs(prompts), greedy(16)))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with running_llm(tiny_checkpoint, tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        assert token_ids(llm.generate(as_inputs(prompts), greedy(16))) == single


def test_pipeline_parallel_matches_the_reference(tmp_path, monkeypatch):
    """PP=2 on 6 layers: each rank holds a `jet`, an `attn` and a `swa` layer (and only
    those layers' states); prompts longer than a 64-token step are prefilled in chunks."""
    layer_types = ["jet", "attn", "swa", "jet", "swa", "attn"]
    path = write_random_checkpoint(tmp_path / "six", preset_config("tiny", num_hidden_layers=6,
                                   layer_types=layer_types), seed=4, dtype=torch.float32)
    prompts = random_prompts([5, 150, 70, 1], seed=8)
    reference = JetNemotronForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = [reference_greedy(reference, p, 12) for p in prompts]
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function
    with running_llm(str(path), pipeline_parallel_size=2, distributed_executor_backend="mp",
                     max_num_batched_tokens=64, max_num_seqs=4) as llm:
        states = llm.apply_model(bound_state_shapes)
        assert token_ids(llm.generate(as_inputs(prompts), greedy(12))) == expected
    assert [len(s) for s in states] == [1, 1]  # one JetBlock's states per rank


def test_more_pipeline_ranks_than_layers_is_refused(tiny_checkpoint):
    with pytest.raises(Exception, match=r"pipeline_parallel_size 5 is larger than the checkpoint's "
                                        r"num_hidden_layers \(4\)"):
        start_llm(tiny_checkpoint, pipeline_parallel_size=5, distributed_executor_backend="mp")


def test_replayssm_is_refused(tiny_checkpoint):
    """vLLM refuses `--use-replayssm` for a model that does not declare `SupportsReplaySSM`
    (`VllmConfig.validate_mamba_cached_kernel`): a JetBlock keeps one state per draft
    position, and ReplaySSM's single column would have it read states that are not there."""
    with pytest.raises(Exception, match=r"--use-replayssm is not supported for architecture "
                                        r"'JetNemotronForCausalLM'"):
        start_llm(tiny_checkpoint, use_replayssm=True)


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, path)
    return path


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(checkpoint_copy, capfd):
    name = "model.layers.2.self_attn.dynamic_conv1d.kernel_generator.w2.bias"
    rewrite_weights(checkpoint_copy, lambda t: t.pop(name))
    with pytest.raises(Exception) as error, running_llm(str(checkpoint_copy)):
        pass
    assert_engine_error_mentions(error, capfd, f"missing 1 tensor(s) the config needs: {name}")


def test_wrong_shape_names_tensor_and_both_shapes(checkpoint_copy, capfd):
    name = "model.layers.0.self_attn.A_log"
    rewrite_weights(checkpoint_copy, lambda t: t.__setitem__(name, torch.zeros(3)))
    with pytest.raises(Exception) as error, running_llm(str(checkpoint_copy)):
        pass
    assert_engine_error_mentions(error, capfd, f"{name!r} has shape (3,) but config.json implies (2,)")


def test_non_finite_weights_are_refused_by_name(checkpoint_copy, capfd):
    """A checkpoint from a training run that diverged is not served (it gave '!!!!' and NaN
    log-probs): the error names the folder and each tensor holding NaN or an infinity."""
    nan, inf = "model.layers.2.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"

    def diverge(tensors):
        tensors[nan][5, 7] = float("nan")
        tensors[inf][0, -1] = float("-inf")

    rewrite_weights(checkpoint_copy, diverge)
    with pytest.raises(Exception) as error, running_llm(str(checkpoint_copy)):
        pass
    assert_engine_error_mentions(error, capfd, f"checkpoint {checkpoint_copy} has NaN or infinite values in "
                                               f"2 tensor(s): {inf}, {nan}. Was it written by a training run")


@pytest.mark.parametrize("edit, message", [
    (lambda config: config["layer_types"].__setitem__(1, "mamba"), r"layer_types\[1\] is 'mamba'"),
    (lambda config: config.__setitem__("hidden_size", "256"), r"hidden_size must be of type int, got '256'"),
])
def test_malformed_config_fails_before_loading(checkpoint_copy, edit, message):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    edit(config)
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=message), running_llm(str(checkpoint_copy)):
        pass


def assert_engine_error_mentions(error, capfd, text):
    """The engine fails to start; the worker's own error, in its log, names the problem."""
    assert "initialization failed" in str(error.value)
    logs = capfd.readouterr()
    assert text in logs.out + logs.err


def test_checkpoint_without_jetblocks_serves(tmp_path):
    """An all-`attn` Jet-Nemotron (e.g. a converter's draft model) runs: the plugin turns
    off prefix caching, whose hybrid mode needs recurrent layers."""
    from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "attn-only", preset_config(
        "tiny", num_hidden_layers=2, layer_types=["attn", "attn"]), dtype=torch.float32)
    with running_llm(str(path)) as llm:
        assert not llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        (out,) = llm.generate(as_inputs(random_prompts([5])), greedy(4))
    assert len(out.outputs[0].token_ids) == 4
