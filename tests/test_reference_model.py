"""The reference model: official-format round trip, cached generation equal to
recomputation, and gradients reaching every JetBlock parameter (it is trainable)."""

import torch
from safetensors import safe_open

from vllm_jetnemotron.config import checkpoint_tensor_shapes
from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
from vllm_jetnemotron.converter.random_checkpoint import preset_config


def test_checkpoint_holds_exactly_the_official_tensors(tiny_checkpoint):
    expected = checkpoint_tensor_shapes(preset_config("tiny"))
    with safe_open(f"{tiny_checkpoint}/model.safetensors", "pt") as f:
        assert {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()} == expected
        w2 = f.get_tensor("model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w2.weight")
    assert w2.abs().sum() > 0, "dynamic conv generator weights must be non-zero"


def test_save_load_round_trip(reference_model, tmp_path):
    reference_model.save_pretrained(tmp_path)
    reloaded = JetNemotronForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference_model(ids).logits)


def test_cached_generation_equals_recomputation(reference_model):
    ids = torch.randint(0, 150000, (1, 60))  # longer than the 48-token sliding window
    with torch.no_grad():
        generated = reference_model.generate(ids, max_new_tokens=8, do_sample=False)
        recomputed = ids
        for _ in range(8):
            logits = reference_model(recomputed).logits[:, -1]
            recomputed = torch.cat([recomputed, logits.argmax(-1, keepdim=True)], dim=1)
    assert generated.tolist() == recomputed.tolist()


def test_sliding_window_limits_attention(reference_model):
    """A single `swa` layer never sees tokens more than a window (48) back; the hybrid
    model does, through its JetBlocks and full-attention layer."""
    model = JetNemotronForCausalLM(preset_config("tiny", num_hidden_layers=1, layer_types=["swa"])).eval()
    ids = torch.randint(0, 150000, (1, 80))
    changed = ids.clone()
    changed[0, :20] = torch.randint(0, 150000, (20,))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[0, -1], model(changed).logits[0, -1])
        assert not torch.allclose(reference_model(ids).logits[0, -1], reference_model(changed).logits[0, -1])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = JetNemotronForCausalLM(preset_config("tiny"))
    ids = torch.randint(0, 1000, (2, 10))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
