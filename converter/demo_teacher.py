"""A small teacher to convert when no pretrained weights can be downloaded: a Qwen2
model (transformers `Qwen2ForCausalLM`, saved with `save_pretrained`) with a byte-level
BPE tokenizer, both trained on the Python standard library's own source files (present
on every machine with Python).

    python -m vllm_jetnemotron.converter.demo_teacher models/demo-teacher \
        --corpus models/demo-corpus --steps 600

Writes the corpus as `<corpus>/stdlib.jsonl` (one document per source file, fixed order)
and the teacher folder (config, weights, tokenizer, `train_log.jsonl`); both atomically.
The teacher trains on the same token split the converter uses (`data.tokenize_corpus`),
so the converter's validation tokens are unseen by the teacher too.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import RetrievalTask

EOS = "<|endoftext|>"
SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
                "__pycache__", "ensurepip", "pydoc_data", "encodings"}


def stdlib_documents(max_chars: int) -> list[str]:
    """Source files of the standard library (tests and vendored packages skipped), in
    path order, until `max_chars` characters."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_DIRS & set(path.relative_to(root).parts[:-1]):
            continue
        text = path.read_text(errors="replace")
        if not text.strip():
            continue
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs


def write_corpus(corpus_dir: Path, max_chars: int) -> Path:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    file = corpus_dir / "stdlib.jsonl"
    if not file.is_file():
        tmp = file.with_suffix(".tmp")
        with tmp.open("w") as f:
            for doc in stdlib_documents(max_chars):
                f.write(json.dumps({"text": doc}) + "\n")
        tmp.replace(file)
    return file


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path) -> None:
    """Byte-level BPE (GPT-2 / Qwen style) saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.save_pretrained(out_dir)


def tiny_qwen2_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                      eos_id: int, max_positions: int = 4096):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, rope_theta=10000.0, tie_word_embeddings=True,
                       bos_token_id=eos_id, eos_token_id=eos_id, rms_norm_eps=1e-6,
                       architectures=["Qwen2ForCausalLM"])


def pretrain(out_dir: Path, corpus: Path, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
             intermediate: int, steps: int, batch_size: int, seq_len: int, lr: float, seed: int,
             max_tokens: int, retrieval: RetrievalTask, retrieval_share: float, val_fraction: float = 0.05,
             eval_every: int = 200) -> Path:
    """Train tokenizer and teacher on text with `retrieval_share` of each batch carrying
    retrieval records; write `out_dir` atomically. Returns it. Every `eval_every` steps
    and at the end, the validation perplexity and held-out retrieval accuracy go to
    `train_log.jsonl`."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from .atomic_files import folder_written_atomically
    from .data import TrainingData, retrieval_set, tokenize_corpus, validation_batches
    from .training import lm_loss, lr_at, retrieval_recall

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists")
    with folder_written_atomically(out_dir) as tmp:
        texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
        train_tokenizer(texts, vocab_size, tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        tokens = tokenize_corpus([str(corpus)], str(tmp), tmp / "cache", seq_len, val_fraction, max_tokens)
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        torch.manual_seed(seed)
        config = tiny_qwen2_config(len(tokenizer), hidden, layers, heads, kv_heads, intermediate,
                                   tokenizer.eos_token_id)
        model = Qwen2ForCausalLM(config).float()
        data = TrainingData(tokens.train, retrieval, retrieval_share)
        val = validation_batches(tokens.val, 8, batch_size, seq_len)
        heldout = retrieval_set(tokens.val, 128, seq_len, retrieval, seed)

        def quality(step: int) -> dict:
            model.eval()
            logits = lambda ids: model(input_ids=ids).logits  # noqa: E731
            loss = lm_loss(logits, val, torch.device("cpu"))
            recalled, queries = retrieval_recall(logits, heldout, torch.device("cpu"), batch_size)
            result = {"step": step, "val_ppl": round(math.exp(loss), 3), "retrieval": recalled / queries}
            model.train()
            print(f"teacher step {step}: validation perplexity {result['val_ppl']:.2f}, held-out "
                  f"retrieval {result['retrieval']:.1%}", flush=True)
            return result

        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        log = (tmp / "train_log.jsonl").open("w")
        started = time.time()
        model.train()
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup=min(50, steps // 10 + 1))
            ids = data.batch(batch_size, seq_len, seed, "teacher", step)
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            log.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), "seconds": round(time.time() - started, 1)}) + "\n")
            if (step + 1) % 20 == 0 or step == 0:
                print(f"teacher step {step + 1}/{steps} loss {float(loss.detach()):.3f} "
                      f"({time.time() - started:.0f} s)", flush=True)
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                log.write(json.dumps(quality(step + 1)) + "\n")
        log.close()
        model.eval()
        model.save_pretrained(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--corpus", type=Path, required=True, help="folder for stdlib.jsonl")
    p.add_argument("--max-chars", type=int, default=6_000_000)
    p.add_argument("--max-tokens", type=int, default=20_000_000, help="must match the recipe's max_tokens")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrieval-share", type=float, default=0.25,
                   help="share of each batch carrying retrieval records (data.RetrievalTask)")
    p.add_argument("--retrieval-pairs", type=int, default=RetrievalTask.pairs)
    p.add_argument("--retrieval-queries", type=int, default=RetrievalTask.queries)
    p.add_argument("--retrieval-key-len", type=int, default=RetrievalTask.key_len)
    p.add_argument("--retrieval-value-len", type=int, default=RetrievalTask.value_len)
    args = p.parse_args(argv)
    started = time.time()
    corpus = write_corpus(args.corpus, args.max_chars)
    pretrain(args.out_dir, corpus, args.vocab_size, args.hidden, args.layers, args.heads, args.kv_heads,
             args.intermediate, args.steps, args.batch_size, args.seq_len, args.lr, args.seed, args.max_tokens,
             RetrievalTask(args.retrieval_key_len, args.retrieval_value_len, args.retrieval_pairs,
                           args.retrieval_queries), args.retrieval_share)
    print(f"wrote the teacher {args.out_dir} in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
