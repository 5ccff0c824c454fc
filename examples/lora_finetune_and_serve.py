"""Fine-tune a LoRA adapter on a local text file with `peft`, then serve it with vLLM.

    python examples/lora_finetune_and_serve.py path/to/checkpoint notes.txt --out my-adapter

Trains the adapter on the project's Hugging Face model (`vllm_jetnemotron.converter.modeling`,
which loads official checkpoints), writes it in the PEFT format, and continues the text's
opening with vLLM, with and without the adapter. To serve it to OpenAI clients:

    python -m vllm_jetnemotron serve path/to/checkpoint --enable-lora --lora-modules mine=my-adapter
"""

import argparse
from pathlib import Path

# Every linear layer of Jet-Nemotron's official modules (JetBlock, attention, MLP).
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj", "o_proj", "w1", "w2",
                  "gate_proj", "up_proj", "down_proj"]


def finetune(model_path: str, text: str, out: Path, args) -> tuple[float, float]:
    """Train a LoRA on next-token prediction over `text` cut into blocks; returns the
    first and last step's loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    torch.manual_seed(0)
    base = JetNemotronForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_path, config=base.config)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    blocks = [ids[i : i + args.block] for i in range(0, max(1, len(ids) - 1), args.block)]
    model = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGET_MODULES))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for step in range(args.steps):
        block = blocks[step % len(blocks)][None]  # [1, T]
        loss = model(input_ids=block, labels=block).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.save_pretrained(out)
    return losses[0], losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a Jet-Nemotron checkpoint folder")
    parser.add_argument("text", help="a UTF-8 text file to fine-tune on")
    parser.add_argument("--out", default="jet-nemotron-lora", help="folder for the adapter")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--block", type=int, default=256, help="tokens per training sequence")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                        help="KV/state budget (on CPU vLLM otherwise reserves most of host RAM)")
    args = parser.parse_args()

    text = Path(args.text).read_text(encoding="utf-8")
    first, last = finetune(args.model, text, Path(args.out), args)
    print(f"training loss: {first:.3f} -> {last:.3f} ({args.steps} steps); adapter in {args.out}")

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=args.model, enable_lora=True, max_lora_rank=args.rank, max_model_len=4096,
              kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    prompt = text[:80]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    base = llm.generate([prompt], params)[0].outputs[0].text
    tuned = llm.generate([prompt], params, lora_request=LoRARequest("mine", 1, str(Path(args.out).resolve())))
    print(f"prompt: {prompt!r}")
    print(f"base model:   {base!r}")
    print(f"with adapter: {tuned[0].outputs[0].text!r}")
    print(f"serve it: python -m vllm_jetnemotron serve {args.model} --enable-lora "
          f"--max-lora-rank {args.rank} --lora-modules mine={args.out}")


if __name__ == "__main__":  # vLLM starts worker processes
    main()
