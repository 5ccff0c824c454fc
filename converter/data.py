"""Training and evaluation data: the corpus tokenised once (cached in the workdir),
deterministic batches (a batch is a function of seed, stage, step and rank, so a resumed
run sees exactly the batches it would have seen), the retrieval task and user eval sets.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic_files import save_atomic

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


def source_name(file: Path, source: Path) -> str:
    """How a data mix names a file: its path inside the source folder, or its file name."""
    return file.relative_to(source).as_posix() if source.is_dir() else file.name


def read_documents(sources: list[str]):
    """Yield (source name, document): lines of .jsonl files (field `text`), whole other
    files, or the `text` column of a `datasets` dataset when a source is not a local path
    (`name` or `name:config`, split `train`)."""
    for source in sources:
        path = Path(source)
        if path.exists():
            for file in list_text_files([source]):
                name = source_name(file, path)
                if file.suffix == ".jsonl":
                    for line in file.read_text(errors="replace").splitlines():
                        if line.strip():
                            record = json.loads(line)
                            if isinstance(record, dict) and record.get("text"):
                                yield name, record["text"]
                else:
                    yield name, file.read_text(errors="replace")
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
                yield source, record["text"]


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
    spans: dict[str, tuple[int, int]]  # source name -> [start, end) of its tokens in `train`


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
        if "spans" in tokens:  # caches written before data mixes lack them: tokenised again
            return TokenData(tokens["train"], tokens["val"], tokens["spans"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    starts: dict[str, int] = {}
    ends: dict[str, int] = {}
    for name, doc in read_documents(sources):
        if not doc.strip():
            continue
        starts.setdefault(name, len(ids))
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
        ends[name] = len(ids)
        if len(ids) >= max_tokens:
            break
    needed = 4 * seq_len + 2
    if len(ids) < needed:
        raise DataError(f"the data {sources} gives {len(ids)} tokens; at least {needed} "
                        f"(4 x seq_len + 2) are needed")
    tokens = torch.tensor(ids[:max_tokens], dtype=torch.int64)
    n_val = max(2 * seq_len + 2, int(len(tokens) * val_fraction))
    n_train = len(tokens) - n_val
    spans = {name: (start, min(ends[name], n_train)) for name, start in starts.items() if start < n_train}
    data = TokenData(train=tokens[:n_train], val=tokens[n_train:], spans=spans)
    if write:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_atomic({"train": data.train, "val": data.val, "spans": data.spans}, cache)
    log.info("tokenised %d training and %d validation tokens", len(data.train), len(data.val))
    return data


def step_generator(seed: int, *keys) -> torch.Generator:
    """A generator determined by the seed and the given keys (stage name, step, rank)."""
    digest = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def train_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, stage: str,
                step: int, rank: int = 0, mix: tuple[tuple[float, int, int], ...] = ()) -> torch.Tensor:
    """`[batch_size, seq_len]` random windows of `tokens`, fixed by (seed, stage, step, rank).
    `mix`: (share, start, end) per mixed source: a row falls in that span with that
    probability, and anywhere in `tokens` otherwise."""
    g = step_generator(seed, stage, step, rank)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g)
    if mix:
        draws = torch.rand(batch_size, generator=step_generator(seed, stage, step, rank, "mix"))
        offsets = torch.rand(batch_size, generator=g)
        low = 0.0
        for share, start, end in mix:
            rows = (draws >= low) & (draws < low + share)
            starts[rows] = start + (offsets[rows] * (end - seq_len - start + 1)).long()
            low += share
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


@dataclass(frozen=True)
class RetrievalTask:
    """Multi-query associative recall written over real text: `pairs` key-value records
    (random sequences of `key_len` and `value_len` tokens from the data's vocabulary) at
    random places in the first half of a window, and at its end `queries` of the keys
    again, each followed by its value, which a model can only recall from the context.
    Records are split by the parity of their token-id sums: training rows use even keys
    and values, held-out rows odd ones, so no held-out key or value is ever trained on."""

    key_len: int = 2
    value_len: int = 4
    pairs: int = 8
    queries: int = 4

    @classmethod
    def from_recipe(cls, section: dict) -> "RetrievalTask":
        """The task a recipe's `retrieval` section describes."""
        return cls(section["key_len"], section["value_len"], section["pairs"], section["queries"])

    @property
    def record_len(self) -> int:
        return self.key_len + self.value_len

    def check(self, seq_len: int) -> None:
        if self.queries > self.pairs:
            raise DataError(f"retrieval queries ({self.queries}) cannot exceed pairs ({self.pairs})")
        if self.pairs * self.record_len > seq_len // 2 - 1 or self.queries * self.record_len > seq_len // 2:
            raise DataError(f"seq_len {seq_len} is too short for {self.pairs} retrieval records of "
                            f"{self.record_len} tokens in its first half and {self.queries} queries after it")

    def write(self, rows: torch.Tensor, vocabulary: torch.Tensor, g: torch.Generator,
              heldout: bool) -> torch.Tensor:
        """Write records and queries into `rows` [N, L] in place; returns the positions
        [N, queries, value_len] of the queried value tokens."""
        n, length = rows.shape
        rec, tail = self.record_len, self.queries * self.record_len
        keys = random_sequences(vocabulary, (n, self.pairs, self.key_len), g, odd=heldout)
        values = random_sequences(vocabulary, (n, self.pairs, self.value_len), g, odd=heldout)
        records = torch.cat([keys, values], dim=-1)  # [N, pairs, rec]
        free = length // 2 - 1 - self.pairs * rec  # filler tokens left between the records
        for i in range(n):
            gaps = torch.randint(0, free + 1, (self.pairs,), generator=g).sort().values  # [pairs]
            starts = 1 + gaps + torch.arange(self.pairs) * rec  # record p after gaps[p] filler tokens
            rows[i, (starts[:, None] + torch.arange(rec)).flatten()] = records[i].flatten()
            asked = torch.randperm(self.pairs, generator=g)[:self.queries]
            rows[i, length - tail:] = records[i, asked].flatten()
        first = length - tail + self.key_len + torch.arange(self.queries) * rec  # [queries]
        return (first[:, None] + torch.arange(self.value_len)).expand(n, -1, -1)


def record_vocabulary(tokens: torch.Tensor) -> torch.Tensor:
    """The distinct token ids of `tokens`, which retrieval records are drawn from."""
    vocabulary = tokens.unique()
    if set((vocabulary % 2).tolist()) != {0, 1}:
        raise DataError("the data's vocabulary needs both even and odd token ids for retrieval records")
    return vocabulary


def random_sequences(vocabulary: torch.Tensor, shape: tuple[int, ...], g: torch.Generator,
                     odd: bool) -> torch.Tensor:
    """Tokens drawn uniformly from `vocabulary` (`record_vocabulary`), each sequence (last
    dim) with an odd or even sum of ids (its last token redrawn until it has)."""
    ids = vocabulary[torch.randint(len(vocabulary), shape, generator=g)]
    wrong = ids.sum(-1) % 2 != int(odd)
    while wrong.any():
        last = ids[..., -1]
        last[wrong] = vocabulary[torch.randint(len(vocabulary), (int(wrong.sum()),), generator=g)]
        wrong = ids.sum(-1) % 2 != int(odd)
    return ids


@dataclass
class TrainingData:
    """Training windows of the corpus, a share of them (`retrieval_share` of each batch,
    rounded) carrying training-split retrieval records."""

    tokens: torch.Tensor  # [N] int64
    retrieval: RetrievalTask | None = None
    retrieval_share: float = 0.0
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # TokenData.spans
    mix: tuple[tuple[float, int, int], ...] = ()  # (share, start, end) per mixed source

    def __post_init__(self):
        self.vocabulary = record_vocabulary(self.tokens) if self.retrieval and self.retrieval_share else None

    def mixed(self, shares: dict[str, float], seq_len: int) -> "TrainingData":
        """The same data with `shares` of the windows drawn from the named sources (the
        rest from all tokens, so a source also keeps its natural share of those)."""
        if not shares:
            return self
        mix = []
        for name, share in shares.items():
            if name not in self.spans:
                raise DataError(f"data mix source {name!r} is not in the training data; its sources are "
                                f"{sorted(self.spans)}")
            start, end = self.spans[name]
            if end - start < seq_len:
                raise DataError(f"data mix source {name!r} has {end - start} training tokens, fewer than "
                                f"seq_len {seq_len}")
            mix.append((share, start, end))
        mixed = TrainingData(self.tokens, self.retrieval, self.retrieval_share, self.spans, tuple(mix))
        mixed.vocabulary = self.vocabulary
        return mixed

    def batch(self, batch_size: int, seq_len: int, seed: int, stage: str, step: int, rank: int = 0) -> torch.Tensor:
        ids = train_batch(self.tokens, batch_size, seq_len, seed, stage, step, rank, self.mix)
        count = round(self.retrieval_share * batch_size) if self.vocabulary is not None else 0
        if count:
            self.retrieval.check(seq_len)
            self.retrieval.write(ids[:count], self.vocabulary, step_generator(seed, stage, step, rank, "retrieval"),
                                 heldout=False)
        return ids


def validation_batches(tokens: torch.Tensor, num_batches: int, batch_size: int, seq_len: int) -> list[torch.Tensor]:
    """Evenly spaced windows of the validation tokens (the same for every candidate)."""
    count = num_batches * batch_size
    span = len(tokens) - seq_len
    starts = [int(i * span / max(1, count - 1)) for i in range(count)] if span > 0 else [0] * count
    windows = torch.stack([tokens[s:s + seq_len] for s in starts])
    return list(windows.split(batch_size))


@dataclass
class RetrievalSet:
    """Prompts and, per query, the positions of the value tokens to recall."""

    input_ids: torch.Tensor  # [N, L]
    value_positions: torch.Tensor  # [N, queries, value_len]


def retrieval_set(tokens: torch.Tensor, num_samples: int, seq_len: int, task: RetrievalTask,
                  seed: int) -> RetrievalSet:
    """Held-out retrieval prompts: windows of `tokens` (the validation split) with the
    task's held-out records. Records lie in the first half of a window and queries in its
    last `queries * record_len` tokens, so every recall spans at least `seq_len / 2 -
    queries * record_len` tokens (104 of 256 with the defaults): beyond a shorter sliding
    window."""
    task.check(seq_len)
    g = step_generator(seed, "retrieval")
    starts = torch.randint(0, len(tokens) - seq_len, (num_samples,), generator=g)
    rows = torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])
    positions = task.write(rows, record_vocabulary(tokens), g, heldout=True)
    return RetrievalSet(rows, positions.contiguous())


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
