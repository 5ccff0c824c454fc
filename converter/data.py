"""Training and evaluation data: the corpus tokenised once (cached in the workdir),
deterministic batches (a batch is a function of seed, stage, step and rank, so a resumed
run sees exactly the batches it would have seen), the retrieval task and user eval sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("jet_nemotron_convert")

TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".c", ".h", ".html", ".tex")


class DataError(ValueError):
    """Training data that is missing, empty or too small."""


def list_text_files(sources: list[str]) -> list[Path]:
    """Local files named in `sources`, folders expanded (sorted, text suffixes only)."""
    files = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not found:
                raise DataError(f"data folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
    return files


def read_documents(sources: list[str]):
    """Yield documents: lines of .jsonl files (field `text`), whole other files, or the
    `text` column of a `datasets` dataset when a source is not a local path
    (`name` or `name:config`, split `train`)."""
    for source in sources:
        path = Path(source)
        if path.exists():
            for file in list_text_files([source]):
                if file.suffix == ".jsonl":
                    for line in file.read_text(errors="replace").splitlines():
                        if line.strip():
                            record = json.loads(line)
                            if isinstance(record, dict) and record.get("text"):
                                yield record["text"]
                else:
                    yield file.read_text(errors="replace")
            continue
        if "/" in source or source.startswith(".") or source.endswith(TEXT_SUFFIXES):
            raise DataError(f"data path {source} does not exist")
        try:
            import datasets
        except ImportError:
            raise DataError(f"data source {source!r} is not a local path, and the `datasets` package "
                            "is not installed (pip install datasets) to load it by name") from None
        name, _, config = source.partition(":")
        for record in datasets.load_dataset(name, config or None, split="train", streaming=True):
            if record.get("text"):
                yield record["text"]


def _fingerprint(sources: list[str], tokenizer_dir: str, max_tokens: int) -> str:
    h = hashlib.sha256(json.dumps([sources, str(tokenizer_dir), max_tokens]).encode())
    for file in list_text_files([s for s in sources if Path(s).exists()]):
        stat = file.stat()
        h.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


@dataclass
class TokenData:
    train: torch.Tensor  # [N] int64, documents joined by eos
    val: torch.Tensor


def tokenize_corpus(sources: list[str], tokenizer_dir: str, cache_dir: Path, seq_len: int,
                    val_fraction: float, max_tokens: int, write: bool = True) -> TokenData:
    """Tokenise the corpus with the teacher's tokenizer, or load the cached tokens."""
    for source in sources:
        path = Path(source)
        if not path.exists() and ("/" in source or source.endswith(TEXT_SUFFIXES)):
            raise DataError(f"data path {source} does not exist")
    cache = cache_dir / f"tokens-{_fingerprint(sources, tokenizer_dir, max_tokens)}.pt"
    if cache.is_file():
        tokens = torch.load(cache)
        return TokenData(tokens["train"], tokens["val"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for doc in read_documents(sources):
        if not doc.strip():
            continue
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        if len(ids) >= max_tokens:
            break
    needed = 4 * seq_len + 2
    if len(ids) < needed:
        raise DataError(f"the data {sources} gives {len(ids)} tokens; at least {needed} "
                        f"(4 x seq_len + 2) are needed")
    tokens = torch.tensor(ids[:max_tokens], dtype=torch.int64)
    n_val = max(2 * seq_len + 2, int(len(tokens) * val_fraction))
    data = TokenData(train=tokens[:-n_val], val=tokens[-n_val:])
    if write:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save({"train": data.train, "val": data.val}, tmp)
        tmp.replace(cache)
    log.info("tokenised %d training and %d validation tokens", len(data.train), len(data.val))
    return data


def step_generator(seed: int, *keys) -> torch.Generator:
    """A generator determined by the seed and the given keys (stage name, step, rank)."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def train_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, stage: str,
                step: int, rank: int = 0) -> torch.Tensor:
    """`[batch_size, seq_len]` random windows of `tokens`, fixed by (seed, stage, step, rank)."""
    g = step_generator(seed, stage, step, rank)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def validation_batches(tokens: torch.Tensor, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Evenly spaced windows of the validation tokens (the same for every candidate)."""
    count = num_batches * batch_size
    span = len(tokens) - seq_len
    starts = [int(i * span / max(1, count - 1)) for i in range(count)] if span > 0 else [0] * count
    windows = torch.stack([tokens[s:s + seq_len] for s in starts])
    return list(windows.split(batch_size))


@dataclass
class RetrievalSet:
    """Prompts `[N, L]` whose last `value_len` tokens repeat a value placed early in the
    context after the same key; `targets` marks those positions (recall them exactly)."""

    input_ids: torch.Tensor  # [N, L]
    value_positions: torch.Tensor  # [N, value_len]: positions whose token is to be predicted


def retrieval_set(tokens: torch.Tensor, num_samples: int, seq_len: int, value_len: int, seed: int,
                  key_len: int = 2) -> RetrievalSet:
    """Built from the data: a window of real text as filler, a key (`key_len` tokens) and a
    value (`value_len` tokens), both spans of real text, written near the start; the
    prompt ends with the key again, and the model must continue with the value. The
    distance between the two copies is most of `seq_len`, beyond a sliding window."""
    g = step_generator(seed, "retrieval")
    rows, positions = [], []
    record = key_len + value_len
    for _ in range(num_samples):
        start = int(torch.randint(0, len(tokens) - seq_len, (1,), generator=g))
        row = tokens[start:start + seq_len].clone()
        span_start = int(torch.randint(0, len(tokens) - record, (1,), generator=g))
        kv = tokens[span_start:span_start + record]
        at = int(torch.randint(1, max(2, seq_len // 8), (1,), generator=g))
        row[at:at + record] = kv
        row[seq_len - record:] = kv
        rows.append(row)
        positions.append(torch.arange(seq_len - value_len, seq_len))
    return RetrievalSet(torch.stack(rows), torch.stack(positions))


@dataclass
class UserEvalSet:
    name: str
    examples: list[tuple[torch.Tensor, int]]  # (prompt + answer ids, number of prompt tokens)


def read_user_eval(path: str, tokenizer_dir: str, seq_len: int) -> UserEvalSet:
    """A jsonl file of {"prompt": ..., "answer": ...}, scored by loss on the answer."""
    from transformers import AutoTokenizer

    file = Path(path)
    if not file.is_file():
        raise DataError(f"eval file {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or "prompt" not in record or "answer" not in record:
            raise DataError(f"{path}:{n}: each line must be a JSON object with 'prompt' and 'answer'")
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(record["answer"], add_special_tokens=False)["input_ids"]
        ids = (prompt + answer)[-seq_len:]
        examples.append((torch.tensor(ids), max(1, len(ids) - len(answer))))
    if not examples:
        raise DataError(f"eval file {path} holds no examples")
    return UserEvalSet(file.stem, examples)
