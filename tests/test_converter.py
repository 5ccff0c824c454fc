"""The PostNAS converter end to end on a tiny Qwen2 teacher (byte-level BPE tokenizer and
a few training steps on standard-library source, seconds): every stage, the export
loading in vLLM with greedy output equal to the reference model's, the draft model and
the EAGLE-3 head with their speculative configs, exact resume after a simulated kill, a 2-process torchrun
stage, and the messages for bad input."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import (LM_EVAL_TASKS, as_inputs, greedy, lm_eval_with_vllm, running_llm, speculative_counters, token_ids,
                      write_lm_eval_tasks)
from vllm_jetnemotron.config import JetNemotronConfig
from vllm_jetnemotron.converter import cli, demo_teacher
from vllm_jetnemotron.converter.data import RetrievalTask, TrainingData, retrieval_set
from vllm_jetnemotron.converter.pipeline import STAGES, stage_dir
from vllm_jetnemotron.converter.recipe import build_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny-test.yaml"
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[str, str]:
    """(teacher folder, corpus folder): hidden 64, 4 layers, 2 heads of 64... head_dim 32
    (vLLM's CPU attention needs >= 32), vocabulary 512, 10 training steps."""
    root = tmp_path_factory.mktemp("teacher")
    corpus = demo_teacher.write_corpus(root / "corpus", max_chars=400_000)
    path = demo_teacher.pretrain(root / "teacher", corpus, vocab_size=512, hidden=64, layers=4, heads=2,
                                 kv_heads=1, intermediate=128, steps=10, batch_size=8, seq_len=64, lr=3e-3,
                                 seed=0, max_tokens=20_000_000, retrieval=RetrievalTask(pairs=2, queries=2),
                                 retrieval_share=0.25, eval_every=5)
    return str(path), str(corpus.parent)


def convert_args(teacher, workdir, out, *extra) -> list[str]:
    return [str(RECIPE), "--teacher", teacher[0], "--data", teacher[1], "--workdir", str(workdir),
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def converted(teacher, tmp_path_factory) -> Path:
    """The tiny-test recipe, with lm-eval's two local tasks as the optional last step."""
    root = tmp_path_factory.mktemp("converted")
    text = next(p for p in sorted(Path(teacher[1]).rglob("*")) if p.is_file()).read_text()
    (root / "lm_eval_tasks").mkdir()
    tasks = write_lm_eval_tasks(root / "lm_eval_tasks", [text[i * 200:i * 200 + 150] for i in range(6)])
    assert cli.main(convert_args(teacher, root / "work", root / "out", "--lm-eval-tasks", *LM_EVAL_TASKS,
                                 "--lm-eval-include-path", str(tasks))) == 0
    return root / "out"


def test_every_stage_and_the_report(converted):
    work = converted.parent / "work"
    for stage in STAGES:
        folder = work / stage.folder
        assert (folder / "done").is_file(), stage
        recorded = json.loads((folder / "fingerprint.json").read_text())
        assert json.loads((folder / "result.json").read_text())["fingerprint"] == recorded
        assert set(recorded["inputs"]) == {"teacher weights", "data tokens", "eval files", "seed", *stage.reads}
    config = JetNemotronConfig.from_pretrained(converted)
    assert config.layer_types.count("attn") == 1 and config.layer_types.count("swa") == 1
    assert config.sliding_window_size == 16
    report = json.loads((converted / "report.json").read_text())
    assert set(report["blocks"]["candidates"]) == {"jet", "gdn"}
    assert len(report["hardware"]["candidates"]) == 2
    assert len(report["placement"]["single_layer"]) == 4
    assert len(report["transfer_errors"]) == 4 and all(0 < e < 10 for e in report["transfer_errors"])
    best_single = sorted(range(4), key=lambda i: (-report["placement"]["single_layer"][i]["score"], i))[:3]
    assert report["placement"]["candidate_layers"] == sorted(best_single)
    for step in report["placement"]["beam_steps"]:  # the beam places attention in candidate layers only
        assert all(t == "jet" or i in best_single for row in step for i, t in enumerate(row["layer_types"]))
    assert [p["layers"] for p in report["placement"]["layer_pairs"]] == [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    assert {"teacher", "converted", "uniform (super-network)", "all_jet (super-network)"} <= set(report["comparison"])
    for row in [*report["comparison"].values(), *report["placement"]["single_layer"],
                *report["placement"]["layer_pairs"]]:
        low, high = row["retrieval_ci95"]
        assert 0 <= low <= row["retrieval"] <= high <= 1 and high - low > 0.05  # 8 prompts x 2 queries
    for name in ("loss_curves", "layer_ablation", "accuracy_vs_throughput"):
        assert (converted / "plots" / f"{name}.png").stat().st_size > 1000
    markdown = (converted / "report.md").read_text()
    assert "| converted |" in markdown and "Two layers kept as attention" in markdown
    assert "beyond both 95% intervals" in markdown or "The searched placement is the uniform one." in markdown
    assert all((converted / folder / "tokenizer.json").is_file() for folder in (".", "draft", "eagle3"))
    draft = JetNemotronConfig.from_pretrained(converted / "draft")
    assert draft.layer_types == ["attn"]


def test_lm_eval_scores_in_the_report_equal_vllm_on_the_checkpoint(converted, tmp_path):
    report = json.loads((converted / "report.json").read_text())["lm_eval"]
    assert set(report) == set(LM_EVAL_TASKS)
    assert "| jet_local_choice | acc,none |" in (converted / "report.md").read_text()
    out = lm_eval_with_vllm(str(converted), converted.parent / "lm_eval_tasks", tmp_path)
    (results,) = out.rglob("results_*.json")
    served = json.loads(results.read_text())["results"]
    for task, metric in (("jet_local_choice", "acc,none"), ("jet_local_generate", "exact_match,none")):
        assert served[task][metric] == pytest.approx(report[task][metric])


@pytest.fixture(scope="module")
def prompts(teacher):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher[0])
    texts = ["import os\n", "def main(argv):\n    ", "class Path:\n    def __init__(self, name):\n        self.",
             "for i in range(10):\n"]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.fixture(scope="module")
def vllm_plain(converted, prompts):
    with running_llm(str(converted)) as llm:
        return token_ids(llm.generate(as_inputs(prompts), greedy(NEW_TOKENS)))


def test_vllm_greedy_equals_reference_model(converted, prompts, vllm_plain):
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    model = JetNemotronForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, vllm_tokens in zip(prompts, vllm_plain):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS)
            assert out[0, len(prompt):].tolist() == vllm_tokens


def test_eagle3_head_speculative_decoding_equals_plain_run(converted, prompts, vllm_plain):
    """The converter's EAGLE-3 head in vLLM: greedy output equals the plain run, and vLLM
    verifies and accepts exactly the drafts that the converter's simulation of its proposer
    (`eagle3.speculative_greedy`: the PyTorch head on the reference model) does."""
    from vllm_jetnemotron.converter.eagle3 import load_eagle3_folder, speculative_greedy
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    speculative_config = json.loads((converted / "speculative_config.json").read_text())
    assert speculative_config["method"] == "eagle3"
    assert Path(speculative_config["model"]) == converted / "eagle3"
    with running_llm(str(converted), speculative_config=speculative_config, disable_log_stats=False) as llm:
        assert token_ids(llm.generate(as_inputs(prompts), greedy(NEW_TOKENS))) == vllm_plain
        counters = speculative_counters(llm)
    target = JetNemotronForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    head = load_eagle3_folder(converted / "eagle3")
    k = speculative_config["num_speculative_tokens"]
    simulated = [speculative_greedy(target, head, prompt, NEW_TOKENS, k) for prompt in prompts]
    assert [tokens for tokens, _, _ in simulated] == vllm_plain
    assert counters["drafts"] == sum(v for _, v, _ in simulated)
    assert counters["accepted_tokens"] == sum(a for _, _, a in simulated) > 0
    report = json.loads((converted / "report.json").read_text())["eagle3"]
    assert report["aux_layers"] == [1, 2, 3] and 1 <= report["acceptance_length"] <= 1 + k


def test_eagle3_training_form_equals_the_proposer_steps():
    """`Eagle3Head.forward` (all positions and draft steps at once, as trained) equals
    the head run one draft at a time on its cache, as vLLM's proposer runs it."""
    from vllm_jetnemotron.converter.eagle3 import Eagle3Head, aux_states
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
    from vllm_jetnemotron.converter.random_checkpoint import preset_config

    torch.manual_seed(0)
    target = JetNemotronForCausalLM(preset_config("tiny")).float().eval()
    head = Eagle3Head.for_target(target, [0, 2, 4], seed=1).eval()
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)  # far from the near-identity start
        ids = torch.randint(0, target.config.vocab_size, (2, 24))
        steps, n = 3, 23
        _, aux = aux_states(target, ids, head.aux_layers)
        embeds = target.model.embed_tokens(ids)
        unrolled = head(embeds, aux, steps)  # [B, steps, 21, vocab]
        prenorm, first_pass = head.midlayer(embeds[:, 1:], head.fc(aux[:, :n]), torch.arange(n), None, ())
        for t in (0, 7, 20):
            hidden, earlier = prenorm[:, t:t + 1], []
            torch.testing.assert_close(unrolled[:, 0, t], head.logits(prenorm)[:, t])
            for j in range(1, steps):
                hidden, kv = head.midlayer(embeds[:, t + 1 + j:t + 2 + j], hidden, torch.tensor([t + j]),
                                           tuple(x[:, :, :t + 1] for x in first_pass), tuple(earlier))
                earlier.append(kv)
                torch.testing.assert_close(unrolled[:, j, t], head.logits(hidden)[:, 0], rtol=1e-4, atol=1e-4)


def test_draft_speculative_decoding_equals_plain_run(converted, prompts, vllm_plain):
    speculative_config = json.loads((converted / "speculative_config.draft_model.json").read_text())
    assert speculative_config["method"] == "draft_model"
    assert Path(speculative_config["model"]) == converted / "draft"
    with running_llm(str(converted), speculative_config=speculative_config) as llm:
        assert token_ids(llm.generate(as_inputs(prompts), greedy(NEW_TOKENS))) == vllm_plain


def test_resume_after_kill_gives_the_same_weights(teacher, converted, tmp_path):
    """Stop every 7 optimiser steps (the checkpoint is saved, the process exits) and
    re-run the same command until it finishes: weights equal the uninterrupted run's."""
    args = convert_args(teacher, tmp_path / "work", tmp_path / "out")
    stops = 0
    while (code := cli.main(args + ["--stop-after", "7"])) == 3:
        stops += 1
        assert not (tmp_path / "out").exists()
        assert stops < 10
    assert code == 0 and stops >= 3
    for name in ("model.safetensors", "draft/model.safetensors", "eagle3/model.safetensors"):
        resumed, reference = load_file(tmp_path / "out" / name), load_file(converted / name)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (name, key)


def converter_process(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vllm_jetnemotron.converter", *args], text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def assert_same_weights(out: Path, reference: Path) -> None:
    for name in ("model.safetensors", "draft/model.safetensors", "eagle3/model.safetensors"):
        tensors, expected = load_file(out / name), load_file(reference / name)
        assert tensors.keys() == expected.keys()
        for key in expected:
            assert torch.equal(tensors[key], expected[key]), (name, key)


def test_kill_during_the_export_leaves_no_partial_folder(teacher, converted, tmp_path):
    """kill -9 while the export writes: no --out, and the rerun removes what the killed
    export left, exports, and gives the uninterrupted run's weights."""
    shutil.copytree(converted.parent / "work", tmp_path / "work")
    args = convert_args(teacher, tmp_path / "work", tmp_path / "out")
    process = converter_process(args, stderr=subprocess.DEVNULL)
    while not list(tmp_path.glob(".out.*/model.safetensors")):  # the export has begun
        assert process.poll() is None, "the converter ended before it was killed"
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert not (tmp_path / "out").exists()
    assert cli.main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "work"]
    assert_same_weights(tmp_path / "out", converted)


def test_an_unreadable_checkpoint_is_trained_again(teacher, converted, tmp_path):
    """A truncated checkpoint.pt of an unfinished stage (a disk problem): the rerun warns,
    naming the file, trains that stage again from step 0 and gives the same weights."""
    work = tmp_path / "work"
    shutil.copytree(converted.parent / "work", work)
    folder = stage_dir(work, "eagle3")
    for name in ("done", "result.json", "model.pt"):
        (folder / name).unlink()
    checkpoint = folder / "checkpoint.pt"
    os.truncate(checkpoint, checkpoint.stat().st_size // 2)
    assert cli.main(convert_args(teacher, work, tmp_path / "out")) == 0
    assert f"eagle3: cannot read {checkpoint} (" in (work / "convert.log").read_text()
    assert "training it again from step 0" in (work / "convert.log").read_text()
    assert_same_weights(tmp_path / "out", converted)


def test_a_full_disk_stops_with_a_message_and_a_rerun_completes(teacher, converted, tmp_path):
    """Files limited to 200 kB (RLIMIT_FSIZE: writes beyond fail with EFBIG, as a full disk
    fails them with ENOSPC) while the last stage writes its 1 MB checkpoint: exit status 2
    and one line naming the file, no traceback; the rerun without the limit completes."""
    import resource
    import signal

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    work = tmp_path / "work"
    shutil.copytree(converted.parent / "work", work)
    shutil.rmtree(stage_dir(work, "eagle3"))
    args = convert_args(teacher, work, tmp_path / "out")
    process = converter_process(args, stderr=subprocess.PIPE, preexec_fn=limit_file_size)
    err = process.communicate(timeout=300)[1]
    assert process.returncode == 2, err[-3000:]
    assert "Traceback" not in err
    checkpoint = stage_dir(work, "eagle3") / "checkpoint.pt.tmp"
    assert err.splitlines()[-1] == (f"jet-nemotron-convert: error: [Errno 27] File too large: '{checkpoint}'; "
                                    "once that is fixed, rerun the same command to go on")
    assert cli.main(args) == 0
    assert_same_weights(tmp_path / "out", converted)


def test_torchrun_two_processes_complete_a_stage(teacher, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "vllm_jetnemotron.converter",
         *convert_args(teacher, tmp_path / "work", tmp_path / "out"), "--until", "supernet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (stage_dir(tmp_path / "work", "supernet") / "done").is_file()
    assert "2 process(es)" in (tmp_path / "work" / "convert.log").read_text()
    assert not (tmp_path / "out").exists()


def final_weights(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(stage_dir(workdir, "final") / "model.pt", weights_only=False)["state_dict"]


def test_a_changed_recipe_is_refused_until_restarted_from_its_stage(teacher, converted, tmp_path, capsys):
    """A finished workdir rerun with another final.steps stops before any work, naming
    the key and the stage to restart from; --restart-from final then gives the weights a
    fresh run with the new recipe gives."""
    work = tmp_path / "work"
    shutil.copytree(converted.parent / "work", work)
    args = convert_args(teacher, work, tmp_path / "out", "--steps", "final=8", "--until", "final")
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "stage final ran with a different recipe: final.steps 6 -> 8" in err
    assert "Rerun with --restart-from final" in err
    assert json.loads((stage_dir(work, "final") / "result.json").read_text())["fingerprint"]["recipe"][
        "final.steps"] == 6  # nothing touched
    assert cli.main(args + ["--restart-from", "final"]) == 0
    assert "redoing" not in (work / "convert.log").read_text()  # stages before final were kept
    fresh = tmp_path / "fresh"
    assert cli.main(convert_args(teacher, fresh, tmp_path / "out", "--steps", "final=8", "--until", "final")) == 0
    restarted, reference = final_weights(work), final_weights(fresh)
    assert len(json.loads((stage_dir(work, "final") / "result.json").read_text())["losses"]) == 8
    assert restarted.keys() == reference.keys()
    for key in reference:
        assert torch.equal(restarted[key], reference[key]), key


def test_a_stage_whose_inputs_changed_is_redone(teacher, converted, tmp_path):
    """Other teacher weights under the same path: the finished teacher, supernet and
    placement stages are redone (not skipped), each naming what changed."""
    work, teacher_dir = tmp_path / "work", tmp_path / "teacher"
    shutil.copytree(converted.parent / "work", work)
    shutil.copytree(teacher[0], teacher_dir)
    weights = load_file(teacher_dir / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, teacher_dir / "model.safetensors", metadata={"format": "pt"})
    old = {name: json.loads((stage_dir(work, name) / "result.json").read_text())
           for name in ("teacher", "placement")}
    assert cli.main(convert_args((str(teacher_dir), teacher[1]), work, tmp_path / "out", "--until", "placement")) == 0
    redone = {line.split("stage ")[1].split(":")[0]: line.split("changed (")[1]
              for line in (work / "convert.log").read_text().splitlines() if "redoing it" in line}
    assert list(redone) == ["teacher", "supernet", "placement"]
    assert redone["teacher"].startswith("teacher weights '") and redone["supernet"].startswith("teacher weights '")
    assert redone["placement"].startswith("supernet '") and ", teacher '" in redone["placement"]
    new = {name: json.loads((stage_dir(work, name) / "result.json").read_text()) for name in old}
    assert new["teacher"]["val_loss"] != old["teacher"]["val_loss"]
    assert new["placement"]["fingerprint"]["inputs"]["teacher"] != old["placement"]["fingerprint"]["inputs"]["teacher"]
    assert (stage_dir(work, "blocks") / "done").is_file()  # not reached: left as it was


TEACHER_EDITS = {
    "no_config": lambda path: (path / "config.json").unlink(),
    "no_weights": lambda path: (path / "model.safetensors").unlink(),
    "truncated_config": lambda path: (path / "config.json").write_text((path / "config.json").read_text()[:40]),
    "config_not_object": lambda path: (path / "config.json").write_text("[1, 2]"),
    "architecture": lambda path: _edit_config(path, architectures=["GPT2LMHeadModel"]),
    "no_hidden_size": lambda path: _edit_config(path, hidden_size=None),
    "layers_as_text": lambda path: _edit_config(path, num_hidden_layers="four"),
}

RECIPE_EDITS = {  # dotted key -> value written into the recipe file
    "deep_draft": ("draft.num_layers", 2),
    "candidates": ("placement.candidate_layers", 1),
    "steps_as_text": ("supernet.steps", "many"),
    "window_as_text": ("budget.swa_window", "big"),
    "heads_as_text": ("jet.num_heads", "four"),
    "val_fraction": ("val_fraction", 2.0),
    "device": ("device", "tpu"),
    "unknown_key": ("final.stepz", 3),
    "retrieval_too_long": ("retrieval.pairs", 20),
    "retrieval_queries": ("retrieval.queries", 3),
    "retrieval_share": ("retrieval.train_share", 1.5),
    "aux_layers_repeated": ("eagle3.aux_layers", [1, 1, 2]),
    "aux_layers_deep": ("eagle3.aux_layers", [1, 2, 5]),
    "mix_unknown_source": ("final.data_mix", {"chat.jsonl": 0.5}),
    "mix_shares": ("final.data_mix", {"stdlib.jsonl": 0.7, "other.jsonl": 0.6}),
}


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (path / "config.json").write_text(json.dumps(config))


def _edited_recipe(tmp_path, key, value) -> str:
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    *sections, leaf = key.split(".")
    node = recipe
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("no_config", "has no config.json"),
    ("no_weights", "has no weights"),
    ("truncated_config", "config.json is not valid JSON"),
    ("config_not_object", "config.json must hold a JSON object, got list"),
    ("architecture", "unsupported architecture ['GPT2LMHeadModel']"),
    ("no_hidden_size", "config.json: hidden_size is missing"),
    ("layers_as_text", "config.json: num_hidden_layers is 'four': Input should be a valid integer"),
    ("missing_teacher", "does not exist"),
    ("budget", "budget asks for 5 attn + 1 swa layers but the teacher"),
    ("candidates", "placement.candidate_layers 1 leaves no room for the budget's 1 attn + 1 swa layers"),
    ("empty_folder", "holds no text files"),
    ("empty_file", "at least"),
    ("missing_data", "data path"),
    ("deep_draft", "recipe key draft.num_layers = 2: must be 1"),
    ("steps_as_text", "recipe key supernet.steps = 'many': Input should be a valid integer"),
    ("window_as_text", "recipe key budget.swa_window = 'big': Input should be a valid integer"),
    ("heads_as_text", "recipe key jet.num_heads = 'four': Input should be a valid integer"),
    ("val_fraction", "recipe key val_fraction = 2.0: Input should be less than 1"),
    ("device", "recipe key device = 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("unknown_key", "unknown recipe key 'final.stepz'; known keys here: ['data_mix', 'lr', 'steps', 'trainable', 'warmup']"),
    ("retrieval_too_long", "seq_len 64 is too short for 20 retrieval records of 6 tokens"),
    ("retrieval_queries", "retrieval queries (3) cannot exceed pairs (2)"),
    ("retrieval_share", "recipe key retrieval.train_share = 1.5: Input should be less than or equal to 1"),
    ("aux_layers_repeated", "recipe key eagle3.aux_layers = [1, 1, 2]: expected three distinct layer indices"),
    ("aux_layers_deep", "eagle3.aux_layers [1, 2, 5]: expected three distinct residual-stream indices in [0, 4]"),
    ("yaml_syntax", "recipe.yaml: YAML syntax error at line 2, column"),
    ("mix_unknown_source", "data mix source 'chat.jsonl' is not in the training data; its sources are "
                           "['stdlib.jsonl']"),
    ("mix_shares", "recipe key final.data_mix = {'other.jsonl': 0.6, 'stdlib.jsonl': 0.7}: the shares add up "
                   "to 1.3; at most 1"),
    ("unknown_lm_eval_task", "eval.lm_eval_tasks: ['no_such_task'] not found among lm-eval's tasks"),
])
def test_bad_input_stops_with_a_message(teacher, tmp_path, capsys, case, message):
    """Exit status 2 and one line naming the problem, before anything is written."""
    teacher_dir, data, extra = teacher[0], teacher[1], []
    if case in TEACHER_EDITS:
        teacher_dir = str(tmp_path / "bad-teacher")
        shutil.copytree(teacher[0], teacher_dir)
        TEACHER_EDITS[case](Path(teacher_dir))
    elif case == "missing_teacher":
        teacher_dir = str(tmp_path / "nowhere")
    elif case == "budget":
        extra = ["--attn", "5"]
    elif case == "empty_folder":
        data = str(tmp_path / "empty")
        os.mkdir(data)
    elif case == "empty_file":
        data = str(tmp_path / "empty.txt")
        Path(data).write_text("")
    elif case == "missing_data":
        data = str(tmp_path / "missing.txt")
    elif case == "unknown_lm_eval_task":
        extra = ["--lm-eval-tasks", "no_such_task"]
    args = convert_args((teacher_dir, data), tmp_path / "work", tmp_path / "out", *extra)
    if case in RECIPE_EDITS:
        args[0] = _edited_recipe(tmp_path, *RECIPE_EDITS[case])
    elif case == "yaml_syntax":
        args[0] = str(tmp_path / "recipe.yaml")
        Path(args[0]).write_text("seq_len: 64\nbudget: {attn: 1, swa: [1}\n")
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def induction_logits(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """An ideal copying model written from scratch: at each position, all mass on the token
    that followed the latest earlier occurrence of the last two tokens (none: token 0)."""
    logits = torch.zeros(*ids.shape, vocab)
    for b, row in enumerate(ids.tolist()):
        seen = {}
        for p in range(1, len(row)):
            logits[b, p, seen.get((row[p - 1], row[p]), 0)] = 1.0
            if p + 1 < len(row):
                seen[(row[p - 1], row[p])] = row[p + 1]
    return logits


def test_retrieval_prompts_are_solvable_only_by_copying_and_held_out(teacher, tmp_path):
    """An ideal copying model recalls every held-out query and the training data's bigram
    model none; no held-out key is a training key; the training mix carries records in
    the given share of each batch, recalled the same way."""
    from vllm_jetnemotron.converter.data import RetrievalSet, tokenize_corpus, train_batch
    from vllm_jetnemotron.converter.training import retrieval_recall

    cpu, vocab, task = torch.device("cpu"), 512, RetrievalTask()
    tokens = tokenize_corpus([teacher[1]], teacher[0], tmp_path, 256, 0.05, 20_000_000)
    heldout = retrieval_set(tokens.val, 32, 256, task, seed=0)
    assert heldout.value_positions.shape == (32, task.queries, task.value_len)
    recalled, queries = retrieval_recall(lambda ids: induction_logits(ids, vocab), heldout, cpu)
    assert queries == 128 and recalled >= 0.97 * queries  # (a key's tokens can recur in the text after it)
    counts = torch.zeros(vocab, vocab).index_put_((tokens.train[:-1], tokens.train[1:]),
                                                  torch.ones(len(tokens.train) - 1), accumulate=True)
    bigram = counts.argmax(1)
    assert retrieval_recall(lambda ids: torch.nn.functional.one_hot(bigram[ids], vocab).float(), heldout, cpu)[0] == 0
    first = heldout.value_positions[:, :, 0]  # a value is written after its key, both in the first half
    keys = {tuple(row[p - task.key_len:p].tolist()) for row, ps in zip(heldout.input_ids, first) for p in ps}
    data = TrainingData(tokens.train, task, retrieval_share=0.25)
    recalled = 0
    for step in range(50):
        ids = data.batch(8, 256, seed=0, stage="teacher", step=step)
        positions = heldout.value_positions[:2]  # the same in every prompt
        recalled += retrieval_recall(lambda x: induction_logits(x, vocab), RetrievalSet(ids[:2], positions), cpu)[0]
        assert torch.equal(ids[2:], train_batch(tokens.train, 8, 256, 0, "teacher", step)[2:])  # plain text
        for row in ids[:2]:
            tail = row[-task.queries * task.record_len:].view(task.queries, task.record_len)
            assert not {tuple(r[:task.key_len].tolist()) for r in tail} & keys
    assert recalled >= 0.97 * 50 * 2 * task.queries


def test_data_mix_draws_its_share_of_windows_from_the_named_file(teacher, tmp_path):
    """Tokens remember which file they came from; `final.data_mix` shares of the training
    windows lie wholly inside that file's tokens, the rest anywhere, as before."""
    from transformers import AutoTokenizer

    from vllm_jetnemotron.converter.data import DataError, tokenize_corpus, train_batch

    data = tmp_path / "data"
    shutil.copytree(teacher[1], data / "prose")
    chats = [f"<user> question {i}? <assistant> answer {i} " * 3 for i in range(40)]
    (data / "chat.jsonl").write_text("".join(json.dumps({"text": c}) + "\n" for c in chats))
    tokens = tokenize_corpus([str(data)], teacher[0], tmp_path / "cache", 32, 0.05, 20_000_000)
    tokenizer = AutoTokenizer.from_pretrained(teacher[0])
    chat_ids = [t for c in chats for t in tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert tokens.spans["chat.jsonl"] == (0, len(chat_ids))  # files in path order: chat.jsonl first
    assert tokens.spans["prose/stdlib.jsonl"] == (len(chat_ids), len(tokens.train))
    assert tokens.train[:len(chat_ids)].tolist() == chat_ids
    assert tokenize_corpus([str(data)], teacher[0], tmp_path / "cache", 32, 0.05, 20_000_000).spans == tokens.spans

    plain = TrainingData(tokens.train, spans=tokens.spans)
    assert plain.mixed({}, 32) is plain
    in_chat = lambda ids: [bool((tokens.train[:len(chat_ids)].unfold(0, 32, 1) == row).all(1).any()) for row in ids]
    only_chat = plain.mixed({"chat.jsonl": 1.0}, 32)
    assert all(all(in_chat(only_chat.batch(8, 32, 0, "final", step))) for step in range(5))
    half = plain.mixed({"chat.jsonl": 0.5}, 32)
    share = sum(sum(in_chat(half.batch(8, 32, 0, "final", step))) for step in range(40)) / 320
    natural = len(chat_ids) / len(tokens.train)
    assert natural < 0.1 and 0.4 < share < 0.6 + natural
    assert torch.equal(plain.batch(8, 32, 0, "final", 3), train_batch(tokens.train, 8, 32, 0, "final", 3))
    with pytest.raises(DataError, match="data mix source 'chat.jsonl' has 1 training tokens, fewer than seq_len 32"):
        TrainingData(tokens.train, spans={"chat.jsonl": (0, 1)}).mixed({"chat.jsonl": 0.2}, 32)


def test_demo_teacher_logs_its_held_out_quality(teacher):
    """Every `eval_every` steps and at the end: validation perplexity and held-out recall."""
    rows = [json.loads(line) for line in (Path(teacher[0]) / "train_log.jsonl").read_text().splitlines()]
    quality = [r for r in rows if "retrieval" in r]
    assert [r["step"] for r in quality] == [5, 10]
    assert all(r["val_ppl"] > 1 and 0 <= r["retrieval"] <= 1 for r in quality)
    assert quality[1]["val_ppl"] < quality[0]["val_ppl"]


def test_the_placement_verdict_needs_disjoint_intervals():
    from vllm_jetnemotron.converter.export import placement_verdict

    def row(types, retrieval, low, high):
        return {"layer_types": types, "retrieval": retrieval, "retrieval_ci95": [low, high]}

    teacher = row(["attn"] * 3, 0.8, 0.78, 0.82)
    uniform = row(["attn", "jet", "jet"], 0.2, 0.17, 0.23)
    apart = placement_verdict({"teacher": teacher, "converted": row(["jet", "attn", "jet"], 0.6, 0.57, 0.63),
                               "uniform (distilled)": uniform})
    assert "ahead beyond both 95% intervals; 20.0 points below the teacher" in apart and "**not**" not in apart
    overlapping = placement_verdict({"teacher": teacher, "converted": row(["jet", "attn", "jet"], 0.25, 0.22, 0.28),
                                     "uniform (distilled)": uniform})
    assert "**not** ahead beyond both 95% intervals" in overlapping


def test_wilson_interval_matches_published_values():
    from vllm_jetnemotron.converter.training import wilson_interval

    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_recipe_numbers_as_people_write_them():
    """YAML reads `1e-3` as a string; the schema takes it as the number it is."""
    import yaml

    values = yaml.safe_load("supernet: {lr: 1e-3}\njet: {norm_eps: 1e-6}\n")
    assert values["supernet"]["lr"] == "1e-3"
    recipe = build_recipe(values, {"teacher": "t", "workdir": "w", "out": "o", "data": ["d"]})
    assert recipe["supernet"]["lr"] == 1e-3 and recipe["supernet"]["steps"] == 200
    assert recipe["jet"]["norm_eps"] == "1e-6"  # written the official way


def test_all_attention_student_equals_the_teacher(teacher):
    """The weight mapping is exact: a student with every layer `attn` is the teacher."""
    from vllm_jetnemotron.converter.students import build_student
    from vllm_jetnemotron.converter.teacher import check_teacher, load_teacher, student_config, teacher_state_dict

    config = check_teacher(teacher[0])
    hf = load_teacher(teacher[0], torch.device("cpu"))
    student = build_student(student_config(config, ["attn"] * 4, {}, 16), teacher_state_dict(hf)).eval()
    ids = torch.randint(0, config["vocab_size"], (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_attention_transfer_trains_each_jetblock_on_its_own_layer(teacher):
    """Layer-wise attention transfer: layer i's error sends gradients to JetBlock i alone
    (nothing flows through the frozen teacher), and a few steps on one batch shrink every
    layer's error against its attention."""
    from vllm_jetnemotron.converter.students import SuperNetwork
    from vllm_jetnemotron.converter.teacher import check_teacher, load_teacher, student_config, teacher_state_dict

    config = check_teacher(teacher[0])
    tensors = teacher_state_dict(load_teacher(teacher[0], torch.device("cpu")))
    jet = {"num_heads": 2, "head_dim": 32, "expand_v": 1.0, "conv_size": 4, "dconv_generator_reduction": 8,
           "norm_eps": "1e-5"}
    net = SuperNetwork(student_config(config, ["attn"] * 4, jet, 16), tensors, 16, seed=0)
    ids = torch.randint(0, config["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(0))
    errors = net(ids, None)
    assert errors.shape == (4,)
    errors[2].backward()
    touched = {name.split(".")[1] for name, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"2"}  # jet_blocks.2.* only; the teacher (base.*) has no trainable parameter
    net.zero_grad()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    before = net(ids, None).detach()
    for _ in range(20):
        optimizer.zero_grad()
        net(ids, None).sum().backward()
        optimizer.step()
    after = net(ids, None).detach()
    assert (after < 0.8 * before).all(), (before, after)
