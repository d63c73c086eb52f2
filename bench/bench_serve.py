"""Serving throughput under concurrent clients: the batched server (model/serving/batching.py) at 1, 4 and 16 clients.

A real server process (``python api_demo.py``, uvicorn on a free local port) serves the ``small`` preset with
random weights (embeddings damped so it writes text; the [PAD] and [EOS] rows zeroed so neither wins the
argmax: every answer runs to ``max_new_tokens`` and its first token is text); a tokenizer is trained on the shared SFT samples, whose prompts the clients send. Each of N
client threads streams greedy chat completions back to back; we count the generated tokens (``usage`` of each
stream) over the wall time, and the time from sending a request to its first streamed text. The levels run in
interleaved rounds (1, 4, 16, 1, 4, 16, ...) so that load from other processes drifting over the run hits them
alike.

The same 16 clients also run against the server with ``--batching=False --max_concurrency=2`` (the previous
design: one request per worker thread, two threads), reported as ``unbatched_16_tokens_per_s``.

ratio = total tokens/s at 16 clients / tokens/s at 1 client (the issue's figure; goal >= 4 on 2 CPU cores).

    python bench/bench_serve.py            # ~6 min on 2 shared cores
    python bench/bench_serve.py --quick    # ~2 min
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import fire
import httpx
import torch

from model.serving.server import sse_events

ROOT = Path(__file__).resolve().parents[1]


def _build_model(work: Path, preset: str) -> tuple[Path, list[str]]:
    from bench.bench_generate import _load_pairs
    from config import EOS_ID, PAD_ID
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    from model.tokenizer.build import train_tokenizer

    pairs = _load_pairs("train_dataset_3k")
    tok = train_tokenizer([t for p in pairs for t in p], vocab_size=4096, token_type="char")
    torch.manual_seed(0)
    model = TextToTextModel.from_preset(preset, vocab_size=len(tok)).eval()
    with torch.no_grad():  # tied random embeddings make a T5 copy [PAD] forever; damp them
        model.shared.weight.mul_(0.05)
        model.shared.weight[EOS_ID].zero_()  # fixed-length answers: [EOS] never wins the argmax
        model.shared.weight[PAD_ID].zero_()  # and no empty [PAD] tokens
    out = save_model_folder(model, tok, work / f"{preset}_random")
    prompts = [p for p, _ in pairs if 4 <= len(p) <= 60][:200]
    return out, prompts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python api_demo.py`` in its own process."""

    def __init__(self, model_dir: Path, max_new: int, threads: int, **flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, str(ROOT / "api_demo.py"), f"--model_dir={model_dir}", f"--port={self.port}",
                f"--max_new_tokens={max_new}", f"--torch_threads={threads}", "--max_queue=64"]
        args += [f"--{k}={v}" for k, v in flags.items()]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), CHATLM_API_KEY="")
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _stream(client: httpx.Client, prompt: str, max_new: int) -> tuple[int, float, float]:
    """(completion tokens, seconds to the first text, total seconds) of one streamed greedy request."""
    body = {"messages": [{"role": "user", "content": prompt}], "stream": True, "max_tokens": max_new,
            "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, used = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for ev in sse_events(r):
            if ev.get("usage"):
                used = ev["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in ev.get("choices", [])):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return used, (first if first is not None else total), total


def _load(url: str, clients: int, seconds: float, prompts: list[str], max_new: int) -> dict:
    """N clients, each sending requests back to back until ``seconds`` have passed."""
    results: list[tuple[int, float, float]] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            i = k
            while time.perf_counter() < stop_at[0]:
                try:
                    r = _stream(c, prompts[i % len(prompts)], max_new)
                except Exception as e:  # reported, not fatal
                    with lock:
                        errors.append(str(e)[:200])
                    return
                with lock:
                    results.append(r)
                i += clients

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    barrier.wait()
    for t in threads:
        t.join()
    return {"results": results, "seconds": time.perf_counter() - t0, "errors": errors}


def _summary(clients: int, runs: list[dict]) -> dict:
    """Rounds of one level together: tokens over wall time, TTFT percentiles over all requests."""
    results = [r for run in runs for r in run["results"]]
    errors = [e for run in runs for e in run["errors"]]
    wall = sum(run["seconds"] for run in runs)
    tokens = sum(r[0] for r in results)
    ttft = sorted(r[1] for r in results)
    pct = lambda q: round(ttft[min(len(ttft) - 1, int(q * len(ttft)))], 3) if ttft else None  # noqa: E731
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": pct(0.5), "ttft_p95_s": pct(0.95),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def main(quick: bool = False, preset: str = "small", threads: int = 1, max_new_tokens: int = 0,
         seconds: float = 0, rounds: int = 0, levels: str = "1,4,16", unbatched: bool = True) -> dict:
    max_new = max_new_tokens or (32 if quick else 64)
    seconds = seconds or (12 if quick else 40)  # per level, split into rounds
    rounds = rounds or (2 if quick else 4)
    levels_n = [int(x) for x in str(levels).split(",")] if isinstance(levels, str) else [int(x) for x in levels]
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model_dir, prompts = _build_model(Path(tmp), preset)
        print(f"built the {preset} model in {time.perf_counter() - t0:.0f} s; {len(prompts)} prompts", flush=True)
        raw: dict[int, list] = {n: [] for n in levels_n}
        srv = Server(model_dir, max_new, threads, max_concurrency=max(levels_n))
        try:
            _load(srv.url, 2, 3, prompts, 8)  # warm-up: kernels' first runs, connections
            for _ in range(rounds):  # levels interleaved: load from other processes drifts over minutes
                for n in levels_n:
                    raw[n].append(_load(srv.url, n, seconds / rounds, prompts, max_new))
        finally:
            srv.close()
        runs = {n: _summary(n, raw[n]) for n in levels_n}
        for r in runs.values():
            print(json.dumps(r), flush=True)
        base = None
        if unbatched:
            srv = Server(model_dir, max_new, threads, max_concurrency=2, batching=False)
            try:
                _load(srv.url, 2, 3, prompts, 8)
                base = _summary(max(levels_n), [_load(srv.url, max(levels_n), seconds / rounds, prompts, max_new)])
                print("unbatched:", json.dumps(base), flush=True)
            finally:
                srv.close()
    lo, hi = runs[min(levels_n)], runs[max(levels_n)]
    res = {"bench": "serve", "ratio": round(hi["tokens_per_s"] / lo["tokens_per_s"], 2),
           "tokens_per_s": {str(n): r["tokens_per_s"] for n, r in runs.items()},
           "ttft_p50_s": {str(n): r["ttft_p50_s"] for n, r in runs.items()},
           "ttft_p95_s": {str(n): r["ttft_p95_s"] for n, r in runs.items()},
           "requests": {str(n): r["requests"] for n, r in runs.items()},
           "errors": sum(r["errors"] for r in runs.values()),
           "unbatched_16_tokens_per_s": base["tokens_per_s"] if base else None,
           "unbatched_16_ttft_p50_s": base["ttft_p50_s"] if base else None,
           "batching_gain_16": round(hi["tokens_per_s"] / base["tokens_per_s"], 2) if base else None,
           "preset": preset, "max_new_tokens": max_new, "seconds_per_level": seconds, "rounds": rounds, "threads": threads,
           "cpus": os.cpu_count(), "device": "cuda" if torch.cuda.is_available() else "cpu", "quick": quick}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    fire.Fire(lambda **kw: main(**kw) and None)
