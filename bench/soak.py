"""Soak run: a real server under bounded random traffic, then checks that nothing leaked.

    .venv/bin/python bench/soak.py [--duration 600] [--concurrency 8] [--model CHECKPOINT]

Serves a small random checkpoint (written by the project's converter, unless --model) with
`python -m vllm_jetnemotron serve` on loopback and drives it with the `openai` client for
--duration seconds after a warm-up: prompts of 1 token up to nearly --max-model-len,
completions and chat, streaming and not, streams dropped midway and requests cancelled,
greedy and seeded sampling requests (a repeat must return the first answer's text), and
invalid requests (prompt too long, negative max_tokens, negative temperature, unknown model,
malformed JSON), which must get a 4xx.

Passes when no valid request failed and no request got a 5xx; /metrics shows no request
running or waiting and no KV/state block in use (JetBlock states are blocks of the same
pool); the resident memory of the engine processes after the run is within 5% of its value
after warm-up; and a fixed set of greedy probes returns the text it returned after warm-up.
Writes bench/results/soak.json (the server's log beside it); exit status 1 if a check fails.
"""

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil

from server_process import free_port, start_server, stop_server

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SERVED_NAME = "jet-soak"
TOKEN_RANGE = 150_000  # random prompt tokens: ids below the Qwen2.5 vocabulary's special tokens
MAX_NEW_TOKENS = 64
REQUEST_TIMEOUT = 300.0
MEMORY_SAMPLE_EVERY = 5.0
RSS_TOLERANCE = 0.05
WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not "
         "which but all were when we there can more one been has their if will each about how up "
         "out them then she many some so these would other into two time could no make than first "
         "water call who its now find long down day did get come made may part over new sound").split()
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:prompt_tokens_cached_total",
            "vllm:generation_tokens_total", "vllm:prefix_cache_queries_total",
            "vllm:prefix_cache_hits_total")

# Request kinds and how often each is sent.
WEIGHTS = {
    "completion": 16, "completion_stream": 12, "chat": 8, "chat_stream": 8, "seeded": 14,
    "dropped_stream": 10, "cancelled": 8,
    "too_long": 3, "negative_max_tokens": 3, "bad_temperature": 3, "unknown_model": 3,
    "malformed_json": 3,
}


@dataclass
class Outcome:
    kind: str
    status: str  # ok | cancelled | rejected (a 4xx to an invalid request) | failed | mismatch
    seconds: float
    detail: str = ""


class Traffic:
    """Random requests of every kind against one server. Remembers the first answer to each
    deterministic request (greedy, or sampled with a seed) and compares each repeat with it."""

    def __init__(self, base_url: str, max_model_len: int, seed: int):
        self.client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                         timeout=REQUEST_TIMEOUT)
        self.http = httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT)
        self.max_model_len = max_model_len
        rng = random.Random(seed)
        self.prompts = token_prompts(rng, count=48, max_len=max_model_len - MAX_NEW_TOKENS)
        self.max_tokens = [rng.randint(1, MAX_NEW_TOKENS) for _ in self.prompts]
        self.chats = [" ".join(rng.choices(WORDS, k=round(2 ** rng.uniform(0, 9)))) for _ in range(16)]
        self.first_answers: dict[tuple, object] = {}

    async def send(self, rng: random.Random) -> Outcome:
        kind = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        start = time.perf_counter()
        try:
            status, detail = await getattr(self, kind)(rng)
        except openai.APIStatusError as e:
            status, detail = "failed", f"HTTP {e.status_code}: {e.message}"
        except Exception as e:  # a valid request must not fail in any way
            status, detail = "failed", f"{type(e).__name__}: {e}"
        return Outcome(kind, status, time.perf_counter() - start, detail)

    def check(self, key: tuple, answer) -> tuple[str, str]:
        first = self.first_answers.setdefault(key, answer)
        return ("ok", "") if answer == first else ("mismatch", f"{key}: {answer!r} != {first!r}")

    async def completion(self, rng, stream: bool = False):
        i = rng.randrange(len(self.prompts))
        response = await self.client.completions.create(
            model=SERVED_NAME, prompt=self.prompts[i], max_tokens=self.max_tokens[i], temperature=0.0,
            stream=stream, extra_body={"ignore_eos": True})
        if stream:
            text = "".join([chunk.choices[0].text async for chunk in response if chunk.choices])
        else:
            text = response.choices[0].text
        return self.check(("completion", i), text)

    async def completion_stream(self, rng):
        return await self.completion(rng, stream=True)

    async def chat(self, rng, stream: bool = False):
        i = rng.randrange(len(self.chats))
        response = await self.client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": self.chats[i]}],
            max_tokens=MAX_NEW_TOKENS // 2, temperature=0.0, stream=stream, extra_body={"ignore_eos": True})
        if stream:
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in response if chunk.choices])
        else:
            text = response.choices[0].message.content
        return self.check(("chat", i), text)

    async def chat_stream(self, rng):
        return await self.chat(rng, stream=True)

    async def seeded(self, rng):
        i, seed, n = rng.randrange(12), rng.randint(1, 3), rng.choice((1, 3))
        response = await self.client.completions.create(
            model=SERVED_NAME, prompt=self.prompts[i], max_tokens=self.max_tokens[i], temperature=1.0,
            seed=seed, n=n, extra_body={"ignore_eos": True})
        texts = tuple(c.text for c in sorted(response.choices, key=lambda c: c.index))
        return self.check(("seeded", i, seed, n), texts)

    async def dropped_stream(self, rng):
        """A stream the client closes after a few chunks."""
        keep = rng.randint(1, 16)
        if rng.random() < 0.5:
            response = await self.client.completions.create(
                model=SERVED_NAME, prompt=rng.choice(self.prompts), max_tokens=MAX_NEW_TOKENS,
                temperature=0.8, stream=True, extra_body={"ignore_eos": True})
        else:
            response = await self.client.chat.completions.create(
                model=SERVED_NAME, messages=[{"role": "user", "content": rng.choice(self.chats)}],
                max_tokens=MAX_NEW_TOKENS, temperature=0.8, stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _ in response:
            received += 1
            if received == keep:
                await response.close()
                return "cancelled", ""
        return "ok", ""

    async def cancelled(self, rng):
        """A greedy request (streaming or not) whose task is cancelled after a random delay."""
        request = self.completion(rng, stream=rng.random() < 0.5)
        try:
            async with asyncio.timeout(rng.uniform(0.05, 2.0)):
                return await request
        except TimeoutError:
            return "cancelled", ""

    async def too_long(self, rng):
        prompt = [rng.randrange(TOKEN_RANGE) for _ in range(self.max_model_len + rng.randint(1, 64))]
        return await expect_4xx(self.client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=8))

    async def negative_max_tokens(self, rng):
        return await expect_4xx(self.client.completions.create(
            model=SERVED_NAME, prompt=rng.choice(self.chats), max_tokens=-rng.randint(1, 100)))

    async def bad_temperature(self, rng):
        return await expect_4xx(self.client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": rng.choice(self.chats)}],
            max_tokens=8, temperature=-rng.uniform(0.1, 2.0)))

    async def unknown_model(self, rng):
        return await expect_4xx(self.client.completions.create(
            model="no-such-model", prompt=rng.choice(self.chats), max_tokens=8))

    async def malformed_json(self, rng):
        body = json.dumps({"model": SERVED_NAME, "prompt": rng.choice(self.chats), "max_tokens": 8})
        response = await self.http.post(rng.choice(("/v1/completions", "/v1/chat/completions")),
                                        content=body[: rng.randrange(1, len(body))],
                                        headers={"Content-Type": "application/json"})
        return classify_invalid(response.status_code, response.text)

    async def probe(self, prompts: list[list[int]]) -> list[str]:
        """Greedy completions of `prompts`, one at a time."""
        texts = []
        for prompt in prompts:
            response = await self.client.completions.create(
                model=SERVED_NAME, prompt=prompt, max_tokens=32, temperature=0.0,
                extra_body={"ignore_eos": True})
            texts.append(response.choices[0].text)
        return texts


async def expect_4xx(request) -> tuple[str, str]:
    try:
        await request
    except openai.APIStatusError as e:
        return classify_invalid(e.status_code, e.message)
    return "failed", "an invalid request was accepted"


def classify_invalid(status_code: int, message: str) -> tuple[str, str]:
    if 400 <= status_code < 500:
        return "rejected", str(status_code)
    return "failed", f"HTTP {status_code}: {message[:300]}"


def token_prompts(rng: random.Random, count: int, max_len: int) -> list[list[int]]:
    """Prefixes of a few random token sequences, lengths log-uniform in [1, max_len], so that
    prompts share prefixes (prefix-cache hits) and cross cache-block boundaries."""
    bases = [[rng.randrange(TOKEN_RANGE) for _ in range(max_len)] for _ in range(4)]
    return [bases[i % len(bases)][: round(max_len ** rng.random())] for i in range(count)]


async def drive(traffic: Traffic, seconds: float, concurrency: int, rng: random.Random,
                server: subprocess.Popen) -> list[Outcome]:
    """`concurrency` clients, each sending one request after the other for `seconds` (or until
    the server exits)."""
    deadline = time.monotonic() + seconds
    outcomes: list[Outcome] = []

    async def client(client_rng: random.Random):
        while time.monotonic() < deadline and server.poll() is None:
            outcomes.append(await traffic.send(client_rng))

    await asyncio.gather(*(client(random.Random(rng.random())) for _ in range(concurrency)))
    return outcomes


async def scrape_metrics(http: httpx.AsyncClient) -> dict[str, float]:
    """The engine gauges and counters of /metrics (summed over labels), and finished requests by
    reason."""
    text = (await http.get("/metrics")).text
    values: dict[str, float] = defaultdict(float)
    for name, labels, value in re.findall(r"^(vllm:\w+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
        if name in GAUGES or name in COUNTERS:
            values[name] += float(value)
        elif name == "vllm:request_success_total":
            reason = re.search(r'finished_reason="([^"]*)"', labels).group(1)
            values[f"{name}:{reason}"] += float(value)
    return dict(values)


async def wait_until_idle(http: httpx.AsyncClient, timeout: float = 120.0) -> dict[str, float]:
    """Polls /metrics until no request runs or waits and no block is in use (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = await scrape_metrics(http)
        if not any(metrics.get(name) for name in GAUGES) or time.monotonic() > deadline:
            return metrics
        await asyncio.sleep(1.0)


def resident_memory(server: psutil.Process) -> dict:
    """RSS in MiB of the API server, of its process tree below it (engine core, workers) and of
    each process of that tree."""
    by_process = {}
    for process in server.children(recursive=True):
        try:
            by_process[f"{process.pid} {process.name()}"] = round(process.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return {"api_server": round(server.memory_info().rss / 2**20, 1),
            "engine": round(sum(by_process.values()), 1), "by_process": by_process}


async def settled_memory(server: psutil.Process, settle: float) -> dict[str, float]:
    """Median of five RSS samples one second apart, after `settle` seconds of idling."""
    await asyncio.sleep(settle)
    samples = []
    for _ in range(5):
        samples.append(resident_memory(server))
        await asyncio.sleep(1.0)
    return {name: statistics.median(s[name] for s in samples) for name in ("api_server", "engine")}


async def sample_memory(server: psutil.Process, samples: list[dict], start: float) -> None:
    while True:
        samples.append({"t": round(time.monotonic() - start, 1), **resident_memory(server)})
        await asyncio.sleep(MEMORY_SAMPLE_EVERY)


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts by kind and status, 4xx status codes, and p50/p99 latency of completed requests."""
    by_kind: dict[str, dict] = {}
    for kind in WEIGHTS:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        seconds = sorted(o.seconds for o in mine if o.status in ("ok", "rejected"))
        by_kind[kind] = {"sent": len(mine), **Counter(o.status for o in mine)}
        if seconds:
            by_kind[kind]["p50_s"] = round(percentile(seconds, 50), 3)
            by_kind[kind]["p99_s"] = round(percentile(seconds, 99), 3)
        codes = Counter(o.detail for o in mine if o.status == "rejected")
        if codes:
            by_kind[kind]["status_codes"] = dict(codes)
    return by_kind


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


async def soak(args, base_url: str, process: subprocess.Popen) -> dict:
    server = psutil.Process(process.pid)
    traffic = Traffic(base_url, args.max_model_len, args.seed)
    rng = random.Random(args.seed + 1)
    probe_rng = random.Random(args.seed + 2)
    probe_prompts = [[probe_rng.randrange(TOKEN_RANGE) for _ in range(n)]
                     for n in (1, 7, 64, 129, 500, args.max_model_len // 2)]
    start = time.monotonic()
    samples: list[dict] = []
    sampler = asyncio.create_task(sample_memory(server, samples, start))
    try:
        print(f"warm-up: {args.warmup:.0f} s of traffic", flush=True)
        warmup = await drive(traffic, args.warmup, args.concurrency, rng, process)
        await wait_until_idle(traffic.http)
        rss_warm = await settled_memory(server, args.settle)
        probes_warm = await traffic.probe(probe_prompts)
        print(f"traffic: {args.duration:.0f} s, {args.concurrency} clients; engine RSS after warm-up "
              f"{rss_warm['engine']:.0f} MiB", flush=True)
        traffic_start = time.monotonic()
        outcomes = await drive(traffic, args.duration, args.concurrency, rng, process)
        traffic_end = time.monotonic()
        await wait_until_idle(traffic.http)
        rss_end = await settled_memory(server, args.settle)
        probes_end = await traffic.probe(probe_prompts)
        metrics_end = await wait_until_idle(traffic.http)
    finally:
        sampler.cancel()
    traffic_seconds = traffic_end - traffic_start
    phases = {"traffic_start_s": round(traffic_start - start, 1),
              "traffic_end_s": round(traffic_end - start, 1)}
    during = [s for s in samples if phases["traffic_start_s"] <= s["t"] <= phases["traffic_end_s"]] or samples
    all_outcomes = warmup + outcomes
    failures = [o for o in all_outcomes if o.status in ("failed", "mismatch")]
    engine_change = rss_end["engine"] / rss_warm["engine"] - 1
    checks = {
        "no_failed_request": not failures,
        "no_request_running_or_waiting": not metrics_end.get("vllm:num_requests_running")
        and not metrics_end.get("vllm:num_requests_waiting"),
        "no_block_in_use": not metrics_end.get("vllm:kv_cache_usage_perc"),
        "engine_rss_within_5pct": abs(engine_change) <= RSS_TOLERANCE,
        "probes_unchanged": probes_end == probes_warm,
    }
    return {
        "seconds": {"warmup": args.warmup, "traffic": round(traffic_seconds, 1)},
        "requests": summarize(outcomes),
        "requests_total": dict(Counter(o.status for o in outcomes), sent=len(outcomes),
                               per_second=round(len(outcomes) / traffic_seconds, 2)),
        "warmup_requests_total": dict(Counter(o.status for o in warmup), sent=len(warmup)),
        "failures": [vars(o) for o in failures[:50]],
        "distinct_deterministic_requests": len(traffic.first_answers),
        "rss_mib": {
            "engine_after_warmup": round(rss_warm["engine"], 1), "engine_end": round(rss_end["engine"], 1),
            "engine_max_during_traffic": round(max(s["engine"] for s in during), 1),
            "engine_change_pct": round(100 * engine_change, 2),
            "api_server_after_warmup": round(rss_warm["api_server"], 1),
            "api_server_end": round(rss_end["api_server"], 1),
            "api_server_max_during_traffic": round(max(s["api_server"] for s in during), 1),
            "samples": {**phases, "every_s": MEMORY_SAMPLE_EVERY, "values": samples},
        },
        "metrics_end": metrics_end,
        "probes": {"prompt_lengths": [len(p) for p in probe_prompts], "match": probes_end == probes_warm,
                   "after_warmup": probes_warm, "end": probes_end},
        "checks": checks,
        "passed": all(checks.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint to serve (default: a random `small` preset one)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic after warm-up")
    parser.add_argument("--warmup", type=float, default=60.0,
                        help="seconds of the same traffic before the reference readings")
    parser.add_argument("--settle", type=float, default=10.0, help="idle seconds before each memory reading")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--kv-bytes", type=int, default=512 << 20)
    parser.add_argument("--dtype", default="float32", help="float32: greedy repeats must be exact")
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    args = parser.parse_args()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="soak-") as workdir:
        model = args.model or str(Path(workdir) / "random-small")
        if not args.model:
            subprocess.run([sys.executable, "-m", "vllm_jetnemotron.converter.random_checkpoint", model,
                            "--preset", "small"], check=True)
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "vllm_jetnemotron", "serve", model, "--host", "127.0.0.1",
                   "--port", str(port), "--served-model-name", SERVED_NAME, "--dtype", args.dtype,
                   "--max-model-len", str(args.max_model_len), "--enforce-eager",
                   "--kv-cache-memory-bytes", str(args.kv_bytes)]
        log_path = args.out.with_name(args.out.stem + "_server.log")
        print(f"starting the server (log: {log_path})", flush=True)
        process = start_server(command, log_path, base_url)
        try:
            result = asyncio.run(soak(args, base_url, process))
        finally:
            stop_server(process)
    result = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "model": args.model or "random small preset", "server_command": command[1:]},
              **result}
    args.out.write_text(json.dumps(result, indent=2))

    totals, rss = result["requests_total"], result["rss_mib"]
    print(f"\n{'kind':<20} {'sent':>6} {'ok':>6} {'cancel':>6} {'4xx':>6} {'failed':>6} {'p50 s':>7} {'p99 s':>7}")
    for kind, r in result["requests"].items():
        print(f"{kind:<20} {r['sent']:6} {r.get('ok', 0):6} {r.get('cancelled', 0):6} {r.get('rejected', 0):6} "
              f"{r.get('failed', 0) + r.get('mismatch', 0):6} {r.get('p50_s', float('nan')):7.3f} "
              f"{r.get('p99_s', float('nan')):7.3f}")
    print(f"{totals['sent']} requests in {result['seconds']['traffic']} s ({totals['per_second']}/s); "
          f"engine RSS {rss['engine_after_warmup']} MiB after warm-up, {rss['engine_end']} MiB at the end "
          f"({rss['engine_change_pct']:+.2f}%), {rss['engine_max_during_traffic']} MiB at most; "
          f"API server {rss['api_server_after_warmup']} -> {rss['api_server_end']} MiB")
    for name, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    for failure in result["failures"][:10]:
        print(f"  {failure['kind']}: {failure['status']}: {failure['detail'][:200]}")
    print(f"wrote {args.out}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
