"""`jet-nemotron-convert build-data`: conversion and evaluation data from what installs by
name on a fresh machine, with held-out splits that share no document with training.

    jet-nemotron-convert build-data models/smollm2-data --teacher models/smollm2-135m-instruct

Three kinds of text, each a list of documents:

* `prose`: English technical prose, the Python documentation's reST sources
  (`html/_sources/**/*.rst.txt` of Debian's `python3.11-doc`, fetched with `apt-get download`
  and unpacked without installing it, or `--docs DIR`);
* `code`: the standard library's modules (`*.py` of the running Python's stdlib, tests and
  site-packages left out);
* `chat`: the teacher's own chat answers, greedy, to questions built from that documentation
  (the FAQ's questions, and one question per library module from its synopsis), formatted
  with the teacher's chat template, so a student is distilled on the teacher's chat
  behaviour. The teacher is served by vLLM (`python -m vllm_jetnemotron serve`, started here
  as a subprocess: the converter itself never imports vLLM).

Each document goes to `heldout` or `train` by a hash of its name (about `--heldout-share`),
so the splits never share a document. OUT holds `train/<kind>.jsonl`, `heldout/<kind>.jsonl`
(one `{"text", "source"}` record per document) and `manifest.json` (documents and teacher
tokens per kind and split, the sources and their versions). The folder is written whole at
the end; a later run with OUT present reuses it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .atomic_files import folder_written_atomically

log = logging.getLogger("jet_nemotron_convert")

DOCS_PACKAGE = "python3.11-doc"
DOCS_SOURCES = "usr/share/doc/python3.11/html/_sources"
KINDS = ("prose", "code", "chat")


class CorpusError(RuntimeError):
    """A source that cannot be had, or a teacher that cannot answer."""


def split_of(name: str, heldout_share: float) -> str:
    """`heldout` or `train`, fixed by the document's name alone."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") / 2**32
    return "heldout" if bucket < heldout_share else "train"


def fetch_docs(cache: Path) -> Path:
    """The unpacked reST sources of Debian's python3.11-doc (downloaded once into `cache`)."""
    sources = cache / DOCS_SOURCES
    if sources.is_dir():
        return sources
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusError(f"no apt-get/dpkg-deb here to fetch {DOCS_PACKAGE}; pass --docs with the "
                          "Python documentation's html/_sources folder")
    with tempfile.TemporaryDirectory() as tmp:
        download = subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=tmp, capture_output=True, text=True)
        if download.returncode != 0:  # an empty package list: update it once and retry
            subprocess.run(["apt-get", "update"], capture_output=True, text=True)
            download = subprocess.run(["apt-get", "download", DOCS_PACKAGE], cwd=tmp, capture_output=True,
                                      text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if download.returncode != 0 or not debs:
            raise CorpusError(f"apt-get download {DOCS_PACKAGE} failed: {download.stderr.strip()[-500:]}")
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], check=True)
        if not (unpacked / DOCS_SOURCES).is_dir():
            raise CorpusError(f"{debs[0].name} has no {DOCS_SOURCES}")
        cache.mkdir(parents=True, exist_ok=True)
        shutil.move(str(unpacked / "usr"), str(cache / "usr"))
        (cache / "package.txt").write_text(debs[0].name + "\n")
    return sources


def prose_documents(docs: Path) -> list[dict]:
    return [{"source": str(p.relative_to(docs)), "text": p.read_text(errors="replace")}
            for p in sorted(docs.rglob("*.rst.txt"))]


def code_documents(stdlib: Path) -> list[dict]:
    skipped = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__")
    files = sorted(p for p in stdlib.rglob("*.py") if not set(p.relative_to(stdlib).parts[:-1]) & set(skipped))
    return [{"source": str(p.relative_to(stdlib)), "text": p.read_text(errors="replace")} for p in files]


def chat_questions(docs: Path) -> list[dict]:
    """The FAQ's questions (section titles ending in '?') and one question per library
    module (`:mod:` title and its synopsis)."""
    questions = []
    for page in sorted((docs / "faq").glob("*.rst.txt")):
        lines = page.read_text(errors="replace").splitlines()
        for title, underline in zip(lines, lines[1:]):
            if title.strip().endswith("?") and re.fullmatch(r"([-=~^\"'])\1{3,}", underline.strip()):
                questions.append({"source": f"faq/{page.name}#{title.strip()}", "question": title.strip()})
    for page in sorted((docs / "library").glob("*.rst.txt")):
        match = re.search(r"^\.\. module:: (\S+)\s*\n(?:\s+:\S+:.*\n)*?\s+:synopsis: (.+)$",
                          page.read_text(errors="replace"), re.M)
        if match:
            module, synopsis = match.group(1), match.group(2).strip().rstrip(".")
            questions.append({"source": f"library/{page.name}",
                              "question": f"What is the Python module {module} for ({synopsis.lower()})? "
                                          "Show a short example."})
    return questions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherServer:
    """`python -m vllm_jetnemotron serve TEACHER` on a free loopback port, stopped on exit."""

    def __init__(self, teacher: Path, dtype: str, log_file: Path):
        self.port = free_port()
        command = [sys.executable, "-m", "vllm_jetnemotron", "serve", str(teacher), "--port", str(self.port),
                   "--host", "127.0.0.1", "--dtype", dtype, "--max-model-len", "2048",
                   "--kv-cache-memory-bytes", str(1 << 30), "--served-model-name", "teacher"]
        self.log = log_file.open("w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> "TeacherServer":
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise CorpusError(f"the teacher's vLLM server exited ({self.process.returncode}); "
                                  f"its log: {self.log.name}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except (urllib.error.URLError, OSError):
                time.sleep(2)
        raise CorpusError(f"the teacher's vLLM server did not become healthy in 600 s; its log: {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def answer(self, question: str, max_tokens: int) -> str:
        body = {"model": "teacher", "messages": [{"role": "user", "content": question}],
                "temperature": 0.0, "max_tokens": max_tokens}
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                         data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=1800) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]


def chat_documents(questions: list[dict], teacher: Path, tokenizer, dtype: str, max_tokens: int,
                   work: Path) -> list[dict]:
    """Each question answered by the teacher, the exchange in the teacher's chat format."""
    with TeacherServer(teacher, dtype, work / "teacher-server.log") as server:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda q: server.answer(q["question"], max_tokens), questions))
    documents = []
    for q, answer in zip(questions, answers):
        messages = [{"role": "user", "content": q["question"]}, {"role": "assistant", "content": answer}]
        documents.append({"source": q["source"], "question": q["question"], "answer": answer,
                          "text": tokenizer.apply_chat_template(messages, tokenize=False)})
    return documents


def build_corpus(out: Path, teacher: Path, docs: Path | None = None, heldout_share: float = 0.05,
                 max_code_tokens: int = 3_000_000, chat_dtype: str = "float32", chat_max_tokens: int = 256,
                 cache: Path | None = None) -> dict:
    """Write the corpus folder `out` (see the module docstring); returns its manifest."""
    from transformers import AutoTokenizer

    out = Path(out)
    if (out / "manifest.json").is_file():
        log.info("%s exists: reusing it", out)
        return json.loads((out / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(teacher))
    if tokenizer.chat_template is None:
        raise CorpusError(f"the teacher {teacher} has no chat template (tokenizer_config.json / "
                          "chat_template.jinja): its chat answers cannot be formatted")
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-jetnemotron"
    docs = Path(docs) if docs else fetch_docs(cache / DOCS_PACKAGE)
    if not (docs / "library").is_dir():
        raise CorpusError(f"--docs {docs}: expected the Python documentation's html/_sources (with library/)")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = {"prose": prose_documents(docs), "code": code_documents(stdlib)}
    # a document-level cap on code, in file order, so the share of code stays bounded
    kept, total = [], 0
    for doc in documents["code"]:
        if total >= max_code_tokens:
            break
        doc["tokens"] = len(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
        kept.append(doc)
        total += doc["tokens"]
    documents["code"] = kept
    with tempfile.TemporaryDirectory() as work:
        log.info("asking the teacher %d questions (vLLM, %s)", len(chat_questions(docs)), chat_dtype)
        documents["chat"] = chat_documents(chat_questions(docs), teacher, tokenizer, chat_dtype, chat_max_tokens,
                                           Path(work))
    manifest = {"teacher": str(teacher), "heldout_share": heldout_share,
                "sources": {"prose": f"{(cache / DOCS_PACKAGE / 'package.txt').read_text().strip()}"
                                     if (cache / DOCS_PACKAGE / "package.txt").is_file() else str(docs),
                            "code": f"Python {sys.version.split()[0]} standard library ({stdlib})",
                            "chat": f"the teacher's greedy answers ({chat_dtype}, at most {chat_max_tokens} "
                                    "tokens) to the FAQ's questions and one question per library module"},
                "splits": {}}
    with folder_written_atomically(out) as tmp:
        for split in ("train", "heldout"):
            (tmp / split).mkdir()
        for kind in KINDS:
            counts = {"train": [0, 0], "heldout": [0, 0]}
            files = {s: (tmp / s / f"{kind}.jsonl").open("w") for s in counts}
            for doc in documents[kind]:
                split = split_of(f"{kind}:{doc['source']}", heldout_share)
                tokens = doc.get("tokens") or len(tokenizer(doc["text"], add_special_tokens=False)["input_ids"])
                files[split].write(json.dumps({k: v for k, v in doc.items() if k != "tokens"}) + "\n")
                counts[split][0] += 1
                counts[split][1] += tokens
            for f in files.values():
                f.close()
            manifest["splits"][kind] = {s: {"documents": d, "tokens": t} for s, (d, t) in counts.items()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    log.info("wrote %s: %s", out, json.dumps(manifest["splits"]))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jet-nemotron-convert build-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="corpus folder to write (reused when it exists)")
    p.add_argument("--teacher", required=True, help="Hugging Face teacher folder (tokenizer, chat template)")
    p.add_argument("--docs", help="the Python documentation's html/_sources (default: fetch python3.11-doc)")
    p.add_argument("--heldout-share", type=float, default=0.05)
    p.add_argument("--max-code-tokens", type=int, default=3_000_000)
    p.add_argument("--chat-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--chat-max-tokens", type=int, default=256)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        manifest = build_corpus(Path(args.out), Path(args.teacher), args.docs and Path(args.docs),
                                args.heldout_share, args.max_code_tokens, args.chat_dtype, args.chat_max_tokens)
    except CorpusError as error:
        print(f"jet-nemotron-convert build-data: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["splits"], indent=2))
    return 0
