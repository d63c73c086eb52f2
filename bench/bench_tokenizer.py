"""Tokenizer training at corpus scale: ours against HF `tokenizers`' BPE trainer and sentencepiece.

Builds the plain-text pretraining corpus from ../shared/data/pretrain (~50 MB, 1,000 lines held out) and a 10x
corpus (the text plus 9 copies, each with 10% of its CJK characters replaced by characters drawn from the
corpus' own character frequencies, so distinct content grows about tenfold as real data does). On each corpus
it trains, each in a child process at vocab 29298:

* ours: ``train_tokenizer.py`` (multi-process piece counting, capped count table, BPE from the counts);
  on the 1x corpus also ``ours_exact``: the same without chunking and without the cap (exact counts of whole
  pieces), to show what the bounded memory costs in compression;
* hf: HF ``tokenizers`` BPE fed line by line with the reference project's settings (NFKC, Punctuation + Digits
  + Metaspace, min_frequency 100): the way the reference trained, the one that needed 48-60 GB for 2 GB;
* spm: sentencepiece unigram on the text file, as usually run on big corpora: on a sample of
  ``--spm_sentences`` sentences (100,000 by default: on all 270k lines of the 1x corpus it alone needs about
  5 CPU-minutes, 15 minutes of wall time on a busy machine).

Reports wall time, peak RSS (the whole process tree sampled every 0.1 s; also the largest single process from
wait4), characters per token on the held-out lines, and the corpus' number of distinct pre-tokenised pieces
(from the HF trainer). Last line: one JSON object; ratio = HF peak RSS / ours on the largest corpus.

    python bench/bench_tokenizer.py            # 1x and 10x (about 20 minutes on 2 free cores)
    python bench/bench_tokenizer.py --quick    # 1x only
"""
from __future__ import annotations

import csv
import gzip
import html
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
PD_TAG = re.compile(r"/[A-Za-z]+\]?[a-z]*|\[|^\d{8}-\d\d-\d{3}-\d{3}")
TROFF_ESC = re.compile(r"\\f[BIRP1-4]|\\\(..|\\[-&e ]|\\s[-+]?\d|\\\*.")
TAG = re.compile(r"<[^>]+>")
SPACES = re.compile(r"[ \u3000\t]+")


# ------------------------------------------------------------------------------------------- corpus
def _raw_lines(root: Path) -> Iterator[str]:
    """Plain text from every folder of ../shared/data/pretrain, one document or paragraph a line."""
    c = root / "clue-corpus-small"
    yield from open(c / "corpora_CLUECorpusSmall_sampled.txt", encoding="utf-8")
    for name in ("corpora_book_review_cls.txt", "corpora_chnsenticorp.txt"):  # label<TAB>text
        for line in open(c / name, encoding="utf-8"):
            yield line.split("\t", 1)[-1]
    for f in [c / "datasets_cmrc2018_test.json", *sorted((root / "cmrc2018-wiki").glob("*.json"))]:
        for d in json.load(open(f, encoding="utf-8"))["data"]:
            for p in d["paragraphs"]:
                yield p["context"]
                for q in p.get("qas", []):
                    yield q["question"]
    for line in open(root / "peoples-daily-1998" / "199801.txt", encoding="utf-8"):
        yield SPACES.sub("", PD_TAG.sub("", line.strip()))  # drop the word/POS tags
    r = root / "reviews"
    for name in ("neg.txt", "pos.txt"):
        yield from open(r / name, encoding="utf-8", errors="replace")
    for f in sorted(r.glob("*.csv")):
        with open(f, encoding="utf-8-sig", newline="") as fh:
            for row in csv.DictReader(fh):
                yield row.get("review") or ""
    for f in sorted((root / "chinese-poetry").rglob("*.json")):
        data = json.load(open(f, encoding="utf-8"))
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict):
                body = rec.get("paragraphs") or rec.get("content") or []
                body = [body] if isinstance(body, str) else body
                if isinstance(body, list):
                    yield "".join(x for x in body if isinstance(x, str))
    for f in sorted((root / "fortunes-zh").iterdir()):
        if f.name != "copyright":
            for entry in ANSI.sub("", f.read_text(encoding="utf-8", errors="replace")).split("\n%\n"):
                yield " ".join(x.strip() for x in entry.splitlines() if x.strip())
    for f in sorted((root / "manpages-zh").rglob("*.gz")):
        if f.read_bytes()[:2] != b"\x1f\x8b":  # a few entries are link stubs
            continue
        buf: list[str] = []
        for line in gzip.open(f, "rt", encoding="utf-8", errors="replace"):
            if line.startswith((".", "'")):  # troff requests end a paragraph
                if buf:
                    yield " ".join(buf)
                    buf = []
                continue
            buf.append(TROFF_ESC.sub("", line.strip()))
        if buf:
            yield " ".join(buf)
    for f in sorted((root / "debian-reference-zh" / "html").glob("*.html")):
        yield from html.unescape(TAG.sub("\n", f.read_text(encoding="utf-8", errors="replace"))).splitlines()
    for f in sorted((root / "medical-text").glob("*.txt")):
        for line in open(f, encoding="utf-8", errors="replace"):
            if line.startswith("{"):
                try:
                    yield " ".join(str(v) for v in json.loads(line).values())
                    continue
                except ValueError:
                    pass
            yield line


def build_corpus(pretrain: Path, work: Path, heldout: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """Write train_1x.txt and heldout.txt (``heldout`` random lines that no corpus contains)."""
    lines = []
    for line in _raw_lines(pretrain):
        line = SPACES.sub(" ", line.replace("\r", " ").replace("\n", " ")).strip()
        if len(line) >= 2:
            lines.append(line)
    rng = random.Random(seed)
    held = set(rng.sample(range(len(lines)), heldout))
    train, test = work / "train_1x.txt", work / "heldout.txt"
    train.write_text("".join(l + "\n" for i, l in enumerate(lines) if i not in held), encoding="utf-8")
    test.write_text("".join(lines[i] + "\n" for i in sorted(held)), encoding="utf-8")
    return train, test


def build_copies(train: Path, out: Path, copies: int = 10, rate: float = 0.10) -> Path:
    """The text plus ``copies - 1`` copies with ``rate`` of their CJK characters replaced, drawn from the
    corpus' own CJK character frequencies (new distinct pieces, realistic characters)."""
    import numpy as np

    text = train.read_text(encoding="utf-8")
    a = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    cjk = np.flatnonzero((a >= 0x4E00) & (a <= 0x9FFF))
    vals, counts = np.unique(a[cjk], return_counts=True)
    p = counts / counts.sum()
    with open(out, "w", encoding="utf-8") as w:
        w.write(text)
        for k in range(1, copies):
            rng = np.random.default_rng(k)
            b = a.copy()
            pick = cjk[rng.random(len(cjk)) < rate]
            b[pick] = rng.choice(vals, size=len(pick), p=p)
            w.write(b.tobytes().decode("utf-32-le"))
    return out


# ------------------------------------------------------------------------------------- contestants
def run_hf(corpus: str, out: str, vocab_size: int = 29298) -> None:
    """The reference project's tokenizer training, fed line by line (child process)."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    specials = ["[PAD]", "[EOS]", "[SEP]", "[BOS]", "[CLS]", "[MASK]", "[UNK]"]
    tok = Tokenizer(BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Metaspace()])
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Metaspace()
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=100, show_progress=False, special_tokens=specials)

    def lines():
        with open(corpus, encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")

    tok.train_from_iterator(lines(), trainer=trainer)
    Path(out).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(out) / "tokenizer.json"))
    (Path(out) / "info.json").write_text(json.dumps({"distinct_pieces": trainer.get_word_count(),
                                                     "vocab": tok.get_vocab_size()}))


def run_spm(corpus: str, out: str, vocab_size: int = 29298, sentences: int = 0) -> None:
    """Sentencepiece unigram on the text file (child process)."""
    import sentencepiece as spm

    Path(out).mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=str(Path(out) / "spm"), model_type="unigram", vocab_size=vocab_size,
        character_coverage=0.9995, num_threads=os.cpu_count() or 1, input_sentence_size=sentences,
        shuffle_input_sentence=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(Path(out) / "spm.model"))
    (Path(out) / "info.json").write_text(json.dumps({"vocab": sp.get_piece_size(), "sentences": sentences}))


def _measure(cmd: list[str]) -> dict:
    """Run a child, sampling the RSS of its whole process tree; wall time and wait4's largest-process RSS."""
    import psutil

    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    peak = [0]
    stop = threading.Event()

    def sample():
        try:
            p = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not stop.is_set():
            total = 0
            try:
                for q in [p] + p.children(recursive=True):
                    try:
                        total += q.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            peak[0] = max(peak[0], total)
            stop.wait(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(peak[0] / 2**20),
            "maxrss_largest_process_mb": round(usage.ru_maxrss / 1024), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def _chars_per_token(kind: str, out: Path, held: list[str]) -> dict:
    chars = sum(len(h) for h in held)
    if kind == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
        ids = sp.encode(held)
        n, unk = sum(len(x) for x in ids), sum(x.count(sp.unk_id()) for x in ids)
    else:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        enc = tok.encode_batch(held, add_special_tokens=False)
        unk_id = tok.token_to_id("[UNK]")
        n, unk = sum(len(e.ids) for e in enc), sum(e.ids.count(unk_id) for e in enc)
    return {"chars_per_token": round(chars / n, 4), "unk_tokens": unk}


def _contest(name: str, corpus: Path, held: list[str], work: Path, vocab_size: int, spm_sentences: int,
             num_proc: int) -> dict:
    out = work / f"{name}_{corpus.stem}"
    py = sys.executable
    if name.startswith("ours"):
        cmd = [py, "train_tokenizer.py", f"--inputs={corpus}", f"--output_dir={out}", f"--vocab_size={vocab_size}",
               f"--num_proc={num_proc}", "--show_progress=False"]
        if name == "ours_exact":  # no chunking, no cap: what the scaling costs in compression
            cmd += ["--chunk_chars=0", "--max_pieces=1000000000", "--feed_pieces=0"]
    elif name == "hf":
        cmd = [py, __file__, "--run=hf", f"--corpus={corpus}", f"--out={out}", f"--vocab_size={vocab_size}"]
    else:
        cmd = [py, __file__, "--run=spm", f"--corpus={corpus}", f"--out={out}", f"--vocab_size={vocab_size}",
               f"--spm_sentences={spm_sentences}"]
    print(f"[{time.strftime('%H:%M:%S')}] {name} on {corpus.name} ...", flush=True)
    res = _measure(cmd)
    res.update(_chars_per_token(name, out, held))
    info = out / ("training_stats.json" if name.startswith("ours") else "info.json")
    if info.is_file():
        extra = json.loads(info.read_text())
        for k in ("distinct_pieces", "vocab", "vocab_size", "tau", "sentences", "count_seconds", "train_seconds"):
            if k in extra:
                res[k] = extra[k]
    print(f"    {json.dumps(res)}", flush=True)
    return res


def main(quick: bool = False, data_dir: str = str(ROOT.parent / "shared" / "data"), work_dir: str = "",
         vocab_size: int = 29298, copies: int = 10, spm: bool = True, spm_sentences: int = 100_000,
         num_proc: int = 0, keep: bool = False, run: str = "", corpus: str = "", out: str = "") -> None:
    """``work_dir``: where corpora and tokenizers go (default: a temporary folder, removed unless ``keep``)."""
    if run == "hf":
        return run_hf(corpus, out, vocab_size)
    if run == "spm":
        return run_spm(corpus, out, vocab_size, spm_sentences)
    pretrain = Path(data_dir) / "pretrain"
    if not pretrain.is_dir():
        raise SystemExit(f"{pretrain} is missing: the tokenizer bench needs ../shared/data/pretrain")
    import tempfile

    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train1, test = build_corpus(pretrain, work)
    held = test.read_text(encoding="utf-8").splitlines()
    corpora = {"1x": train1}
    if not quick:
        corpora[f"{copies}x"] = build_copies(train1, work / f"train_{copies}x.txt", copies)
    sizes = {k: round(p.stat().st_size / 2**20, 1) for k, p in corpora.items()}
    print(f"corpora (MB): {sizes}, held-out lines: {len(held)}, built in {time.time() - t0:.0f} s", flush=True)
    results: dict = {}
    for label, path in corpora.items():
        results[label] = {}
        names = ["ours", "hf"] + (["spm"] if spm else []) + (["ours_exact"] if label == "1x" else [])
        for name in names:
            results[label][name] = _contest(name, path, held, work, vocab_size, spm_sentences, num_proc)
        results[label]["corpus_mb"] = sizes[label]
    big = list(corpora)[-1]
    ours, hf = results[big]["ours"], results[big]["hf"]
    summary = {
        "bench": "tokenizer",
        "ratio": round(hf["peak_rss_mb"] / ours["peak_rss_mb"], 2),
        "main_figure": f"peak RSS on the {big} corpus, HF BPE / ours",
        "corpus": big,
        "time_ratio": round(hf["wall_s"] / ours["wall_s"], 2),
        "chars_per_token_ours_vs_hf": round(ours["chars_per_token"] / hf["chars_per_token"], 4),
        "chars_per_token_1x_capped_vs_exact": round(results["1x"]["ours"]["chars_per_token"]
                                                    / results["1x"]["ours_exact"]["chars_per_token"], 4),
        "results": results,
    }
    if not quick:
        summary["ours_rss_1x_over_big"] = round(results["1x"]["ours"]["peak_rss_mb"] / ours["peak_rss_mb"], 3)
        summary["ours_rss_big_over_1x"] = round(ours["peak_rss_mb"] / results["1x"]["ours"]["peak_rss_mb"], 3)
    summary["total_s"] = round(time.time() - t0)
    if not work_dir and not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        summary["work_dir"] = str(work)
    print(json.dumps(summary, ensure_ascii=False))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
