"""Generation speed: ChatBot.stream_chat, the HTTP API and CTranslate2 int8 against raw ``model.generate``.

All paths answer the same prompts (from ../shared/data/sft/chatlm-samples) with the same greedy settings, in
turn per prompt (so load from other processes hits them alike), on two models:
* ``trained``: the ``tiny`` preset fitted for a few hundred steps on the shared SFT samples (or --model_dir),
  used for CTranslate2's greedy agreement with torch fp32 (int8 changes some answers; float32 should not);
* ``base``: the reference's 0.2B shape, random weights (embeddings scaled down so it emits text, not [PAD]):
  per-token cost at the real size.

ratio = stream_chat speed / raw generate speed on the base model (acceptance: >= 0.95), as the median over
prompts of back-to-back pairs (other processes share the cores; "ratio_total_time" is the same from total times).

    python bench/bench_generate.py            # ~10-15 min on 2 shared cores (--threads=2 on an idle machine)
    python bench/bench_generate.py --quick    # ~2 min
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import fire
import torch


def _load_pairs(split: str):
    import pandas as pd

    from config import SHARED_DATA
    p = SHARED_DATA / "sft" / "chatlm-samples" / f"my_{split}.parquet"
    if not p.is_file():
        raise SystemExit(f"{p} is missing: this benchmark reads ../shared/data/sft/chatlm-samples")
    df = pd.read_parquet(p)
    return list(zip(df["prompt"].astype(str), df["response"].astype(str)))


def _build_models(work: Path, train_steps: int, model_dir, base_preset: str):
    """(trained model folder, base-size random model folder)."""
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    from model.tokenizer.build import load_tokenizer, train_tokenizer
    from bench.toy_model import fit_toy_model

    if model_dir:
        trained = Path(model_dir)
        tok = load_tokenizer(trained)
    else:
        pairs = _load_pairs("train_dataset_3k")
        t0 = time.perf_counter()
        tok = train_tokenizer([t for p in pairs for t in p], vocab_size=4096, token_type="char")
        trained = fit_toy_model(work / "trained", pairs, tok, preset="tiny", steps=train_steps, batch_size=16,
                                lr=2e-3)
        print(f"trained the tiny model for {train_steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.manual_seed(0)
    base = TextToTextModel.from_preset(base_preset, vocab_size=len(tok)).eval()
    with torch.no_grad():  # tied random embeddings make a T5 copy [PAD] forever; damp them
        base.shared.weight.mul_(0.05)
    base_dir = save_model_folder(base, tok, work / f"{base_preset}_random")
    del base
    return trained, base_dir


class _Tally:
    """One path's totals over the run: tokens, seconds, per-prompt speed, time to first text, answers that
    differ from raw generate's."""

    def __init__(self):
        self.tokens, self.seconds, self.ttft, self.per_prompt, self.differing = 0, 0.0, [], [], 0

    def add(self, tokens: int, seconds: float, first: float | None = None, differs: bool = False,
            timed_first: bool = True) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.per_prompt.append(tokens / seconds)
        if timed_first:
            self.ttft.append(first if first is not None else seconds)
        self.differing += differs

    def summary(self, raw_per_prompt: list[float]) -> dict:
        ttft = sorted(self.ttft)
        # speed relative to raw generate on the same prompt, measured back to back: robust to load drifting
        # over the run (other processes share these cores); the median over prompts
        rel = sorted(a / b for a, b in zip(self.per_prompt, raw_per_prompt))
        return {"tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 2) if self.seconds else None,
                "median_speed_vs_raw": round(rel[len(rel) // 2], 3) if rel else None,
                "ttft_median_ms": round(1000 * ttft[len(ttft) // 2], 1) if ttft else None,
                "answers_differing_from_raw": self.differing}


def _time_raw_generate(bot, ids: list[int], gen_cfg) -> tuple[int, float, str]:
    """Baseline: plain transformers generate, no project code in the loop -> (tokens, seconds, text)."""
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = bot.model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
    dt = time.perf_counter() - t0
    gen = out[0, 1:].tolist()
    return len(gen), dt, bot.tokenizer.decode(gen, skip_special_tokens=True)


def _time_stream_chat(bot, q: str) -> tuple[float, float | None, str]:
    """(seconds, seconds to the first piece, text) of ``ChatBot.stream_chat``."""
    t0 = time.perf_counter()
    first, text = None, ""
    for piece in bot.stream_chat(q):
        if first is None:
            first = time.perf_counter() - t0
        text += piece
    return time.perf_counter() - t0, first, text


def _time_api_stream(client, q: str) -> tuple[int, float, float | None, str]:
    """(completion tokens, seconds, seconds to the first text, text) of one streamed API chat completion."""
    body = {"messages": [{"role": "user", "content": q}], "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, text, used = None, "", 0
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                used = ev["usage"]["completion_tokens"]
            for ch in ev.get("choices", []):
                c = ch["delta"].get("content")
                if c:
                    if first is None:
                        first = time.perf_counter() - t0
                    text += c
    return used, time.perf_counter() - t0, first, text


def _time_ct2(ct2, ids: list[int]) -> tuple[int, float, float, str]:
    """(tokens, seconds, seconds to the first piece, text) of the CTranslate2 engine."""
    from model.serving.infer import TokenStreamer
    stamps = []
    s = TokenStreamer(ct2.tokenizer, on_text=lambda _p: stamps.append(time.perf_counter()), skip_first=False)
    t0 = time.perf_counter()
    r = ct2.generate(ids, streamer=s)
    dt = time.perf_counter() - t0
    return r.completion_tokens, dt, (stamps[0] - t0) if stamps else dt, r.text


def _ct2_bot(common: dict, ct2_dir: Path):
    """The CTranslate2 engine over the same folder, or None when ctranslate2 is not installed."""
    from model.serving.infer import ChatBot
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        print("ctranslate2 is not installed: skipping --engine ct2", flush=True)
        return None
    return ChatBot(**common, engine="ct2", ct2_dir=str(ct2_dir))


def _warm_up(bot, ct2, client, prompt: str) -> None:
    """First calls pay one-off costs (thread pools, kernels' first run, the HTTP connection): pay them here."""
    x0 = torch.tensor([bot.build_input_ids(prompt)])
    bot.model.generate(input_ids=x0, attention_mask=torch.ones_like(x0),
                       generation_config=bot.model.generation_kwargs("greedy", 4))
    list(bot.stream_chat(prompt, max_new_tokens=4))
    if ct2 is not None:
        ct2.chat(prompt, max_new_tokens=4)
    if client is not None:
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                  "max_tokens": 4})


def _time_prompt(tally: dict, bot, ct2, client, q: str, gen_cfg) -> None:
    """One prompt through every path in turn, back to back."""
    ids = bot.build_input_ids(q)
    n, dt, ref = _time_raw_generate(bot, ids, gen_cfg)
    tally["raw_generate"].add(n, dt, timed_first=False)
    dt, first, text = _time_stream_chat(bot, q)
    tally["stream_chat"].add(n, dt, first, text != ref)  # same greedy answer (counted when not)
    if client is not None:
        used, dt, first, text = _time_api_stream(client, q)
        tally["api_stream"].add(used, dt, first, text != ref)
    if ct2 is not None:
        n_ct2, dt, first, text = _time_ct2(ct2, ids)
        tally["ct2_int8"].add(n_ct2, dt, first, text != ref)


def _measure(model_dir: Path, prompts, max_new: int, threads: int, rounds: int, with_api: bool, ct2_dir: Path,
             label: str):
    """Per-path totals: tokens, seconds, time to first text; every prompt through every path in turn."""
    import httpx
    from rich.progress import Progress

    from model.serving.infer import ChatBot
    from model.serving.server import ServerThread, create_app

    common = dict(model_dir=str(model_dir), max_new_tokens=max_new, max_prompt_tokens=256, torch_threads=threads,
                  max_concurrency=1, search_type="greedy")
    bot = ChatBot(**common)
    s = bot.settings()  # the folder's decoding defaults, as ChatBot applies them
    gen_cfg = bot.model.generation_kwargs("greedy", max_new, repetition_penalty=s["repetition_penalty"],
                                          no_repeat_ngram_size=s["no_repeat_ngram_size"])
    ct2 = _ct2_bot(common, ct2_dir)
    paths = ["raw_generate", "stream_chat"] + (["api_stream"] if with_api else []) + (["ct2_int8"] if ct2 else [])
    tally = {p: _Tally() for p in paths}
    server = ServerThread(create_app(bot)).__enter__() if with_api else None
    client = httpx.Client(base_url=server.url, timeout=600) if server else None
    _warm_up(bot, ct2, client, prompts[0])
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{label}: generating", total=rounds * len(prompts))
            for _ in range(rounds):
                for q in prompts:
                    _time_prompt(tally, bot, ct2, client, q, gen_cfg)
                    progress.advance(task)
    finally:
        if client is not None:
            client.close()
            server.__exit__(None, None, None)
    raw_pp = tally["raw_generate"].per_prompt
    return {p: t.summary(raw_pp) for p, t in tally.items()}, bot, ct2


def _agreement(bot, ct2_dir: Path, prompts, max_new: int, threads: int) -> dict:
    """Share of prompts whose greedy answer is identical to torch fp32's, for ct2 int8 and ct2 float32."""
    from model.serving.infer import ChatBot
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return {}
    out = {}
    ref = [bot.chat(q) for q in prompts]
    for compute in ("int8", "float32"):
        cb = ChatBot(model_dir=str(bot.model_dir), engine="ct2", ct2_dir=str(ct2_dir), ct2_compute_type=compute,
                     max_new_tokens=max_new, max_prompt_tokens=256, torch_threads=threads)
        got = [cb.chat(q) for q in prompts]
        out[f"ct2_{compute}_greedy_equal_fp32"] = round(sum(a == b for a, b in zip(got, ref)) / len(ref), 3)
    out["agreement_prompts"] = len(prompts)
    return out


def main(quick: bool = False, model_dir: str | None = None, n_prompts: int | None = None,
         max_new_tokens: int | None = None, threads: int = 1, rounds: int = 1, train_steps: int | None = None,
         n_agree: int | None = None, base_preset: str = "base", keep: bool = False):
    torch.set_num_threads(threads)
    n_prompts = n_prompts or (3 if quick else 12)
    max_new = max_new_tokens or (24 if quick else 64)
    train_steps = train_steps or (60 if quick else 200)
    n_agree = n_agree or (16 if quick else 100)
    test = _load_pairs("test_dataset_2k")
    prompts = [p for p, _ in test if len(p) <= 60]
    work = Path(tempfile.mkdtemp(prefix="bench_generate_"))
    t_start = time.perf_counter()
    try:
        trained, base_dir = _build_models(work, train_steps, model_dir, base_preset)
        res_trained, bot_t, _ = _measure(trained, prompts[:max(n_prompts, 8)], max_new, threads, rounds, True,
                                         work / "ct2_trained", "trained")
        agree = _agreement(bot_t, work / "ct2_trained", prompts[:n_agree], max_new, threads)
        del bot_t
        res_base, _, _ = _measure(base_dir, prompts[:n_prompts], max_new, threads, rounds, True,
                                  work / "ct2_base", base_preset)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"greedy generation, {threads} thread(s), max_new_tokens={max_new}")
    for col in ("model", "path", "tokens", "seconds", "tokens/s", "vs raw (total)", "vs raw (median pair)",
                "TTFT ms (median)", "differs"):
        table.add_column(col)
    for name, res in (("trained tiny", res_trained), (f"{base_preset} (random)", res_base)):
        raw = res["raw_generate"]["tokens_per_s"]
        for p, v in res.items():
            table.add_row(name, p, str(v["tokens"]), f"{v['seconds']:.1f}", f"{v['tokens_per_s']}",
                          f"{v['tokens_per_s'] / raw:.3f}x", f"{v['median_speed_vs_raw']}x", str(v["ttft_median_ms"]),
                          str(v["answers_differing_from_raw"]))
    Console(width=150).print(table)
    if agree:
        print(f"CTranslate2 greedy answers equal to torch fp32 on {agree['agreement_prompts']} prompts (trained "
              f"model): int8 {agree['ct2_int8_greedy_equal_fp32']:.1%}, float32 {agree['ct2_float32_greedy_equal_fp32']:.1%}")

    def rel(res, p):
        return round(res[p]["tokens_per_s"] / res["raw_generate"]["tokens_per_s"], 3) if p in res else None

    summary = {
        "bench": "generate",
        # main figure: stream_chat speed / raw generate speed, median of per-prompt back-to-back pairs
        "ratio": res_base["stream_chat"]["median_speed_vs_raw"],
        "ratio_total_time": rel(res_base, "stream_chat"),
        "ratio_trained_tiny": res_trained["stream_chat"]["median_speed_vs_raw"],
        "ratio_total_time_trained_tiny": rel(res_trained, "stream_chat"),
        "api_vs_raw_base": rel(res_base, "api_stream"),
        "api_vs_raw_trained_tiny": rel(res_trained, "api_stream"),
        "ct2_int8_vs_torch_fp32_base": rel(res_base, "ct2_int8"),
        "ct2_int8_vs_torch_fp32_trained_tiny": rel(res_trained, "ct2_int8"),
        **agree,
        "threads": threads, "max_new_tokens": max_new, "quick": quick,
        "base": res_base, "trained_tiny": res_trained,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    fire.Fire(main)
