"""Export and the report: the converted model in the official checkpoint format
(`vllm_jetnemotron/config.py`) with the teacher's tokenizer, the draft in `draft/`, the vLLM
`speculative_config.json`, and `report.json`, `report.md`, `plots/*.png`.

Everything is written to a temporary folder beside `--out` and renamed at the end, so
`--out` either does not exist or holds a complete result.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vllm_jetnemotron.config import JetNemotronConfig

from .atomic_files import errors_naming, folder_written_atomically
from .eagle3 import save_eagle3_folder
from .pipeline import stage_dir
from .teacher import copy_tokenizer_files

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def save_model_folder(saved_file: Path, folder: Path, dtype: torch.dtype, teacher_dir: str) -> JetNemotronConfig:
    """A saved `{config, state_dict}` as a Hugging Face folder plus the teacher's tokenizer."""
    from .modeling import JetNemotronForCausalLM

    saved = torch.load(saved_file, map_location="cpu", weights_only=False)
    config = JetNemotronConfig(**saved["config"])
    config.dtype = dtype
    model = JetNemotronForCausalLM(config)
    model.load_state_dict(saved["state_dict"])
    model.to(dtype).save_pretrained(folder)
    copy_tokenizer_files(teacher_dir, folder)
    if not (folder / "generation_config.json").is_file():
        (folder / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2))
    return config


def save_initial_checkpoint(teacher_dir: str | Path, out: Path, layer_types: list[str], jet: dict,
                            swa_window: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """The student of `layer_types` as the converter initialises it, untrained (teacher
    weights everywhere, JetBlocks by `students.init_jetblock`), as a checkpoint folder."""
    from .students import build_student
    from .teacher import check_teacher, load_teacher, student_config, teacher_state_dict

    config = student_config(check_teacher(teacher_dir), layer_types, jet, swa_window)
    tensors = teacher_state_dict(load_teacher(teacher_dir, torch.device("cpu")))
    model = build_student(config, tensors, seed=seed)
    config.dtype = dtype
    with folder_written_atomically(Path(out)) as tmp:
        model.to(dtype).save_pretrained(tmp)
        copy_tokenizer_files(teacher_dir, tmp)
    return Path(out)


def export(workdir: Path, out: Path, recipe: dict, report: dict) -> Path:
    out = out.resolve()
    if out.exists():
        raise FileExistsError(f"--out {out} already exists; remove it or choose a new folder")
    with errors_naming(out), folder_written_atomically(out) as tmp:
        dtype = DTYPES[recipe["export"]["dtype"]]
        save_model_folder(stage_dir(workdir, "final") / "model.pt", tmp, dtype, recipe["teacher"])
        (tmp / "draft").mkdir()
        save_model_folder(stage_dir(workdir, "draft") / "model.pt", tmp / "draft", dtype, recipe["teacher"])
        save_eagle3_folder(torch.load(stage_dir(workdir, "eagle3") / "model.pt", weights_only=False), tmp / "eagle3",
                           dtype)
        copy_tokenizer_files(recipe["teacher"], tmp / "eagle3")
        for name, method, folder, section in (("speculative_config.json", "eagle3", "eagle3", "eagle3"),
                                              ("speculative_config.draft_model.json", "draft_model", "draft",
                                               "draft")):
            speculative = {"method": method, "model": str(out / folder),
                           "num_speculative_tokens": recipe[section]["num_speculative_tokens"]}
            (tmp / name).write_text(json.dumps(speculative, indent=2) + "\n")
        write_report(tmp, report)
    return out


# ----- report -------------------------------------------------------------------------

def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def write_report(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = folder / "plots"
    plots.mkdir()
    try:
        write_plots(plots, report)
    except ImportError:  # matplotlib missing: the numbers are still in report.json / .md
        pass
    (folder / "report.md").write_text(report_markdown(report))


def _retrieval(r: dict) -> str:
    low, high = r["retrieval_ci95"]
    return f"{r['retrieval']:.1%} ({low:.1%}-{high:.1%})"


def placement_verdict(comparison: dict) -> str:
    """Whether the searched placement's retrieval beats uniform's beyond both 95% intervals."""
    uniform = comparison.get("uniform (distilled)") or comparison.get("uniform (super-network)")
    searched, teacher = comparison["converted"], comparison["teacher"]
    if uniform is None or uniform["layer_types"] == searched["layer_types"]:
        return "The searched placement is the uniform one." if uniform else ""
    apart = searched["retrieval_ci95"][0] > uniform["retrieval_ci95"][1]
    return (f"Searched placement {_retrieval(searched)} vs uniform {_retrieval(uniform)} retrieval: "
            + ("ahead beyond both 95% intervals" if apart else "**not** ahead beyond both 95% intervals")
            + f"; {100 * (teacher['retrieval'] - searched['retrieval']):.1f} points below the teacher.")


def eagle3_summary(eagle3: dict) -> str:
    steps = len(eagle3["top1_agreement_by_step"])
    return (f"EAGLE-3 head (`eagle3/`): reads layers {eagle3['aux_layers']}; greedy agreement by draft step "
            + " / ".join(f"{a:.1%}" for a in eagle3["top1_agreement_by_step"])
            + f"; simulated acceptance length {eagle3['acceptance_length']:.2f} with {steps} drafts "
            f"({eagle3['prompts']} validation prompts, greedy)")


def report_markdown(report: dict) -> str:
    rows = report["comparison"]
    lines = ["# Jet-Nemotron conversion report", "",
             f"Teacher: `{report['teacher']}`  ", f"Layer types: `{report['final']['layer_types']}`  ",
             f"Block: `{report['blocks']['chosen']}`, JetBlock settings: `{report['hardware']['jet']}`  ",
             f"Draft model (`draft/`): {len(report['draft']['layer_map'])} attention layer(s) (teacher layers "
             f"{report['draft']['layer_map']}), greedy agreement with the converted model "
             f"{report['draft']['top1_agreement']:.1%}  ", eagle3_summary(report['eagle3']), "",
             "| model | layer types | val perplexity | retrieval (95% CI) | state / sequence at 4K | at 64K |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {' '.join(r['layer_types'])} | {r['val_ppl']:.3f} | {_retrieval(r)} | "
                     f"{_fmt_bytes(r['state_bytes_4k'])} | {_fmt_bytes(r['state_bytes_64k'])} |")
    lines += ["", "Retrieval: share of held-out queries whose whole value is recalled (keys and values never "
              "trained on), Wilson interval over the queries. State bytes: KV cache of attn/swa layers plus "
              "JetBlock conv and recurrent states, bf16 elements.", "", placement_verdict(rows), ""]
    if "lm_eval" in report:
        lines += ["## lm-eval (converted model, `hf` backend)", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {task} | {metric} | {value:.4f} |" for task, metrics in report["lm_eval"].items()
                  for metric, value in metrics.items()]
        lines.append("")
    transfer = report.get("transfer_errors") or [None] * len(report["placement"]["single_layer"])
    lines += ["## Per-layer ablation (super-network: one layer kept as attention, all others JetBlocks)", "",
              "Transfer error: the layer's JetBlock against its attention on the teacher's hidden states "
              "(squared error relative to the attention output's mean square, after the attention transfer).", "",
              "| layer | score | val loss | retrieval (95% CI) | transfer error |", "|---|---|---|---|---|"]
    for s, error in zip(report["placement"]["single_layer"], transfer):
        lines.append(f"| {s['layer']} | {s['score']:.4f} | {s['val_loss']:.4f} | {_retrieval(s)} | "
                     f"{'-' if error is None else f'{error:.4f}'} |")
    pairs = {tuple(p["layers"]): p for p in report["placement"]["layer_pairs"]}
    n = len(report["placement"]["single_layer"])
    if pairs:
        lines += ["", "Two layers kept as attention (row, column), all others JetBlocks: retrieval", "",
                  "| | " + " | ".join(str(j) for j in range(1, n)) + " |", "|---" * n + "|"]
        for i in range(n - 1):
            cells = [f"{pairs[i, j]['retrieval']:.1%}" if j > i else "" for j in range(1, n)]
            lines.append(f"| {i} | " + " | ".join(cells) + " |")
    else:
        lines += ["", f"Pairs not scored (placement.pair_ablation: false); the beam placed attention among "
                  f"layers {report['placement']['candidate_layers']}."]
    lines += ["", "![per-layer ablation](plots/layer_ablation.png)"]
    lines += ["", "## Hardware-aware search", "",
              "| candidate | score | val loss | retrieval | decode tok/s | prefill tok/s |", "|---|---|---|---|---|---|"]
    for label, c in report["hardware"]["candidates"].items():
        lines.append(f"| {label} | {c['score']:.4f} | {c['val_loss']:.4f} | {c['retrieval']:.1%} | "
                     f"{c['decode_tokens_per_s']:.0f} | {c['prefill_tokens_per_s']:.0f} |")
    lines += ["", f"Chosen: {report['hardware']['chosen']} (state size {report['hardware']['state_size']} "
              "elements per JetBlock)", "",
              "## Block selection", "", "| block | score | val loss | retrieval | forward tok/s |",
              "|---|---|---|---|---|"]
    for kind, c in report["blocks"]["candidates"].items():
        lines.append(f"| {kind} | {c['score']:.4f} | {c['val_loss']:.4f} | {c['retrieval']:.1%} | "
                     f"{c['forward_tokens_per_s']:.0f} |")
    lines += ["", "## Serving", "",
              "The folder is a Jet-Nemotron checkpoint: `python -m vllm_jetnemotron serve <this folder>`, or "
              "`LLM(model=<this folder>)`. Speculative decoding: pass the content of `speculative_config.json` "
              "(the EAGLE-3 head in `eagle3/`) or of `speculative_config.draft_model.json` (the draft model in "
              "`draft/`) as `--speculative-config` / `LLM(speculative_config=...)`. Their `model` is the "
              "absolute path written at export; vLLM resolves a relative path against the current working "
              "directory, so after moving the folder update that path.", ""]
    return "\n".join(lines)


def write_plots(plots: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, losses in report["loss_curves"].items():
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (KL; transfer: summed relative squared error)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Loss curves")
    fig.tight_layout()
    fig.savefig(plots / "loss_curves.png", dpi=100)
    plt.close(fig)

    single = report["placement"]["single_layer"]
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    layers = [s["layer"] for s in single]
    errors = [[s["retrieval"] - s["retrieval_ci95"][0] for s in single],
              [s["retrieval_ci95"][1] - s["retrieval"] for s in single]]
    ax1.bar([x - 0.2 for x in layers], [s["retrieval"] for s in single], width=0.4, yerr=errors, capsize=3,
            label="retrieval (95% CI)")
    for label, r, style in (("teacher", report["comparison"]["teacher"], "--"),
                            ("all JetBlock", report["placement"]["supernet_layouts"]["all_jet"], ":")):
        ax1.axhline(r["retrieval"], color="gray", linestyle=style, label=f"{label} retrieval")
    ax1.set_xlabel("layer kept as full attention (all others JetBlocks)")
    ax1.set_ylabel("held-out retrieval")
    ax1.set_ylim(0, 1)
    ax1.set_xticks(layers)
    ax2 = ax1.twinx()
    ax2.bar([x + 0.2 for x in layers], [s["val_loss"] for s in single], width=0.4, color="tab:orange",
            label="validation loss")
    ax2.set_ylabel("validation loss")
    ax2.legend(handles=ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0],
               loc="upper left", fontsize=7, framealpha=1)  # on the top axes: above every bar
    ax1.set_title("One layer kept as attention (super-network)")
    if report["placement"]["layer_pairs"]:
        grid = torch.full((len(layers), len(layers)), float("nan"))
        for p in report["placement"]["layer_pairs"]:
            i, j = p["layers"]
            grid[i, j] = grid[j, i] = p["retrieval"]
        image = ax3.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis")
        for p in report["placement"]["layer_pairs"]:
            i, j = p["layers"]
            ax3.text(j, i, f"{p['retrieval']:.0%}", ha="center", va="center", fontsize=7, color="white")
        ax3.set_xticks(layers)
        ax3.set_yticks(layers)
        ax3.set_title("Two layers kept as attention: retrieval")
        fig.colorbar(image, ax=ax3, fraction=0.046)
    elif report.get("transfer_errors"):
        ax3.bar(layers, report["transfer_errors"], color="tab:green")
        ax3.set_xlabel("layer")
        ax3.set_ylabel("relative squared error")
        ax3.set_title("JetBlock vs its attention (attention transfer)")
    fig.tight_layout()
    fig.savefig(plots / "layer_ablation.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in report["hardware"]["candidates"].items():
        ax.scatter(c["decode_tokens_per_s"], c["score"])
        ax.annotate(label, (c["decode_tokens_per_s"], c["score"]), fontsize=7)
    ax.set_xlabel("JetBlock decode throughput (tokens/s, this machine)")
    ax.set_ylabel("score after short training (higher is better)")
    ax.set_title("Hardware-aware search")
    fig.tight_layout()
    fig.savefig(plots / "accuracy_vs_throughput.png", dpi=100)
    plt.close(fig)
