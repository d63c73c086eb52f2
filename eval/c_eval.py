"""Multiple-choice evaluation over a folder of per-subject CSVs (C-Eval and same-shaped sets).

Layout: ``DATA_DIR/{dev,val,test}/<subject>_<split>.csv`` (or a flat folder of CSVs), columns
``id,question,A,B,C,D,answer`` in any letter case (``Question``, ``Answer`` ...; more option letters such as
``E`` are accepted), plus an optional ``subject_mapping.json`` (``subject -> [english, chinese, category]``).

Two scoring modes:
* ``logits`` (the reference's): one encoder pass and one decoder step; the choice is the option letter with the
  highest logit at the first decoding step, restricted to the option letters' token ids;
* ``generate``: greedy generation, then the answer letter (or the option's text) is parsed from the output.

Zero-shot, or k-shot with examples from the ``dev`` split. Results per subject, per category (macro average of
its subjects, as C-Eval reports) and overall, as a table, CSV and JSON; for a split without answers
(C-Eval ``test``) a submission file ``{subject: {id: letter}}``.

    python eval/c_eval.py --model_dir model_save/sft --data_dir ../shared/data/eval/ceval-exam --split val
"""
from __future__ import annotations

import csv
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from config import PAD_ID, PROJECT_ROOT, CEvalConfig, make_config
from model.data.checkpoint import load_model_folder

CATEGORIES = ("STEM", "Social Science", "Humanities", "Other")
UNMAPPED = "Unmapped"
ALL_LETTERS = "ABCDEFGHIJ"
MODES = ("logits", "generate")


@dataclass
class Question:
    subject: str
    qid: str
    question: str
    options: list[str]
    answer: Optional[str] = None  # None when the split has no answers
    letters: str = "ABCD"


@dataclass
class Subject:
    name: str
    questions: list[Question] = field(default_factory=list)
    skipped: int = 0  # rows without question/options or with an answer that is not an option letter
    name_zh: str = ""
    category: str = UNMAPPED


# ------------------------------------------------------------------------------------------- reading
def _columns(df: pd.DataFrame, path: Path) -> tuple[dict[str, str], str]:
    """Map lower-cased canonical names to the file's column names; option letters are the A, B, ... run."""
    lower = {str(c).strip().lower(): c for c in df.columns}
    if "question" not in lower:
        raise ValueError(f"{path}: no 'question' column (columns: {', '.join(map(str, df.columns))})")
    letters = ""
    for letter in ALL_LETTERS:
        if letter.lower() not in lower:
            break
        letters += letter
    if len(letters) < 2:
        raise ValueError(f"{path}: expected option columns A, B, C, D (any case); "
                         f"columns: {', '.join(map(str, df.columns))}")
    cols = {k: lower[k] for k in ("id", "question", "answer") if k in lower}
    cols.update({letter: lower[letter.lower()] for letter in letters})
    return cols, letters


def read_subject_csv(path: str | Path, subject: Optional[str] = None) -> Subject:
    """Read one subject file; bad rows are skipped and counted, never silently scored."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except Exception as e:  # noqa: BLE001 - name the file in the message
        raise ValueError(f"{path}: cannot read as CSV: {e}") from e
    cols, letters = _columns(df, path)
    sub = Subject(name=subject or subject_name(path))
    for i, row in enumerate(df.to_dict("records")):
        q = str(row[cols["question"]]).strip()
        options = [str(row[cols[L]]).strip() for L in letters]
        answer = None
        if "answer" in cols:
            answer = unicodedata.normalize("NFKC", str(row[cols["answer"]])).strip().upper() or None
        if not q or any(o == "" for o in options) or (answer is not None and answer not in letters):
            sub.skipped += 1
            continue
        qid = str(row[cols["id"]]).strip() if "id" in cols else str(i)
        sub.questions.append(Question(sub.name, qid, q, options, answer, letters))
    return sub


def subject_name(path: Path, split: Optional[str] = None) -> str:
    stem = path.stem
    for s in ([split] if split else []) + ["dev", "val", "test", "train"]:
        if stem.endswith("_" + s):
            return stem[: -len(s) - 1]
    return stem


def split_dir(data_dir: str | Path, split: str) -> Path:
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data folder {d} does not exist (expected {d}/{split}/<subject>_{split}.csv)")
    return d / split if (d / split).is_dir() else d


def subject_files(data_dir: str | Path, split: str) -> dict[str, Path]:
    sd = split_dir(data_dir, split)
    files = {subject_name(p, split): p for p in sorted(sd.glob("*.csv"))}
    if not files:
        raise FileNotFoundError(f"no CSV files in {sd}")
    return files


def load_mapping(data_dir: str | Path, split: str = "val") -> dict[str, list[str]]:
    """``subject_mapping.json`` next to the split folders (or inside the flat folder), else empty."""
    d = Path(data_dir)
    for p in (d / "subject_mapping.json", split_dir(d, split) / "subject_mapping.json"):
        if p.is_file():
            return json.loads(p.read_text(encoding="utf-8"))
    return {}


def load_split(data_dir: str | Path, split: str, subjects: Optional[Sequence[str]] = None) -> list[Subject]:
    files = subject_files(data_dir, split)
    if subjects:
        missing = [s for s in subjects if s not in files]
        if missing:
            raise ValueError(f"subject(s) {', '.join(missing)} not in {split_dir(data_dir, split)}; "
                             f"known: {', '.join(sorted(files))}")
        files = {s: files[s] for s in subjects}
    mapping = load_mapping(data_dir, split)
    out = []
    for name, path in files.items():
        sub = read_subject_csv(path, name)
        if name in mapping:
            m = mapping[name]
            sub.name_zh = m[1] if len(m) > 1 else ""
            sub.category = m[2] if len(m) > 2 else UNMAPPED
        out.append(sub)
    return out


# ------------------------------------------------------------------------------------------ prompts
def format_question(q: Question, with_answer: bool = False) -> str:
    text = q.question + "\n" + "".join(f"{L}. {o}\n" for L, o in zip(q.letters, q.options)) + "答案："
    return text + (f"{q.answer}\n\n" if with_answer else "")


def header_line(sub: Subject) -> str:
    name = sub.name_zh or sub.name.replace("_", " ")
    return f"以下是中国关于{name}考试的单项选择题，请选出其中的正确答案。\n\n"


def build_prompt(q: Question, shots: Sequence[Question], header: str = "") -> str:
    """Header, solved dev examples, then the question ending in ``答案：``; the tokenizer appends [EOS]."""
    return header + "".join(format_question(s, True) for s in shots) + format_question(q)


def encode_prompt(tokenizer, q: Question, shots: Sequence[Question], header: str, max_len: int):
    """Token ids within ``max_len``: drop shots from the front first, then cut the prompt's head.

    Cutting the head keeps the options and ``答案：`` next to the decoder, where the answer is read.
    Returns (ids, number of shots used, truncated?).
    """
    shots = list(shots)
    while True:
        ids = tokenizer(build_prompt(q, shots, header))["input_ids"]
        if len(ids) <= max_len or not shots:
            break
        shots = shots[1:]
    truncated = len(ids) > max_len
    if truncated:
        ids = ids[-max_len:]  # still ends with [EOS]
    return ids, len(shots), truncated


# ------------------------------------------------------------------------------------------ scoring
def option_token_ids(tokenizer, letters: str = "ABCD") -> list[int]:
    """The first token id of each option letter; they must be distinct to score by logits."""
    ids = []
    for L in letters:
        toks = tokenizer(L, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ValueError(f"the tokenizer encodes option letter {L!r} to nothing")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"option letters {letters} share token ids {ids}: cannot score by logits")
    return ids


def choose_from_logits(logits: torch.Tensor, option_ids: Sequence[int], letters: str = "ABCD"):
    """(letters, probabilities): softmax over the option letters' logits only; ties go to the earlier letter."""
    sub = logits[:, list(option_ids)].float()
    probs = torch.softmax(sub, dim=-1)
    best = sub.argmax(dim=-1)
    return [letters[i] for i in best.tolist()], probs


@torch.no_grad()
def first_step_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the first decoding step (decoder input = the start token ``[PAD]``)."""
    dec = torch.full((input_ids.shape[0], 1), PAD_ID, dtype=torch.long, device=input_ids.device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec, use_cache=False)
    return out.logits[:, -1, :]


_ANSWER_PATTERNS = (
    r"答案\s*(?:是|为|应该是|应为)?\s*[:：]?\s*[\(（\[【]?\s*([{L}])(?![A-Za-z])",
    r"^[\s\(（\[【]*([{L}])(?![A-Za-z])",
    r"选(?:项|择)?\s*[\(（\[【]?\s*([{L}])(?![A-Za-z])",
    r"(?<![A-Za-z])([{L}])(?![A-Za-z])",
)


def parse_choice(text: str, options: Sequence[str] = (), letters: str = "ABCD") -> Optional[str]:
    """The answer letter in generated text (full-width letters too), else the option whose text it names.

    None when nothing (or more than one option's text) matches: such answers count as wrong and are reported.
    """
    t = unicodedata.normalize("NFKC", text or "").strip()
    if not t:
        return None
    for pat in _ANSWER_PATTERNS:
        m = re.search(pat.replace("{L}", letters), t)
        if m:
            return m.group(1)
    compact = re.sub(r"\s+", "", t)
    hits = [letters[i] for i, o in enumerate(options)
            if (o2 := re.sub(r"\s+", "", unicodedata.normalize("NFKC", o))) and o2 in compact]
    if len(hits) > 1:  # prefer the longest option text when one contains another
        lens = {L: len(options[letters.index(L)]) for L in hits}
        top = max(lens.values())
        hits = [L for L in hits if lens[L] == top]
    return hits[0] if len(hits) == 1 else None


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def score_questions(model, tokenizer, subjects: Sequence[Subject], dev: Optional[dict[str, Subject]] = None,
                    cfg: Optional[CEvalConfig] = None, progress: bool = True) -> list[dict]:
    """One record per question: prediction, correctness, option probabilities (logits) or raw output."""
    cfg = cfg or CEvalConfig()
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}; expected one of {', '.join(MODES)}")
    device = next(model.parameters()).device
    jobs = []
    for sub in subjects:
        header = header_line(sub) if cfg.header else ""
        shots = []
        if cfg.k_shot > 0:
            if dev is None or sub.name not in dev:
                raise FileNotFoundError(f"{cfg.k_shot}-shot needs dev examples for subject {sub.name!r} "
                                        f"(expected {Path(cfg.data_dir) / 'dev' / (sub.name + '_dev.csv')})")
            shots = dev[sub.name].questions[: cfg.k_shot]
        for q in sub.questions:
            ids, n_shots, trunc = encode_prompt(tokenizer, q, shots, header, cfg.max_source_len)
            jobs.append((q, ids, n_shots, trunc))
    order = sorted(range(len(jobs)), key=lambda i: len(jobs[i][1]))  # similar lengths share a batch
    records: list[Optional[dict]] = [None] * len(jobs)
    option_ids = {}
    model.eval()
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"C-Eval {cfg.mode}", total=len(jobs))
        for idx in _batches(order, max(1, cfg.batch_size)):
            batch = [jobs[i] for i in idx]
            width = max(len(j[1]) for j in batch)
            input_ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, (_, ids, _, _) in enumerate(batch):
                input_ids[r, : len(ids)] = torch.tensor(ids)
                mask[r, : len(ids)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            if cfg.mode == "logits":
                logits = first_step_logits(model, input_ids, mask)
                for r, (q, _, n_shots, trunc) in enumerate(batch):
                    if q.letters not in option_ids:
                        option_ids[q.letters] = option_token_ids(tokenizer, q.letters)
                    (pred,), probs = choose_from_logits(logits[r:r + 1], option_ids[q.letters], q.letters)
                    rec = _record(q, pred, n_shots, trunc)
                    rec.update({f"p_{L}": round(float(p), 6) for L, p in zip(q.letters, probs[0].tolist())})
                    records[idx[r]] = rec
            else:
                out = model.my_generate(input_ids, mask, max_new_tokens=cfg.max_new_tokens, search_type="greedy")
                texts = tokenizer.batch_decode(out, skip_special_tokens=True)
                for r, (q, _, n_shots, trunc) in enumerate(batch):
                    pred = parse_choice(texts[r], q.options, q.letters)
                    rec = _record(q, pred, n_shots, trunc)
                    rec["output"] = texts[r]
                    records[idx[r]] = rec
            bar.advance(task, len(batch))
    return [r for r in records if r is not None]


def _record(q: Question, pred: Optional[str], n_shots: int, truncated: bool) -> dict:
    return {"subject": q.subject, "id": q.qid, "answer": q.answer, "pred": pred or "",
            "correct": None if q.answer is None else bool(pred == q.answer),
            "shots": n_shots, "truncated": truncated}


# ------------------------------------------------------------------------------------------ results
def chance_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval of a random guesser's accuracy on ``n`` questions."""
    if n <= 0:
        return (0.0, 1.0)
    half = z * math.sqrt(p * (1 - p) / n)
    return (max(0.0, p - half), min(1.0, p + half))


def summarize(records: Sequence[dict], subjects: Sequence[Subject]) -> dict:
    """Per subject, per category (macro over its subjects) and overall; questions without answers are left out."""
    per_subject = {}
    for sub in subjects:
        recs = [r for r in records if r["subject"] == sub.name and r["correct"] is not None]
        n, correct = len(recs), sum(r["correct"] for r in recs)
        per_subject[sub.name] = {
            "name_zh": sub.name_zh, "category": sub.category, "n": n, "correct": correct,
            "accuracy": correct / n if n else None, "skipped_rows": sub.skipped,
            "unparsed": sum(1 for r in recs if not r["pred"]),
            "truncated": sum(1 for r in records if r["subject"] == sub.name and r["truncated"]),
            "chance": float(sum(1 / len(q.letters) for q in sub.questions) / max(1, len(sub.questions))),
        }
    scored = {k: v for k, v in per_subject.items() if v["n"]}
    cats = [c for c in CATEGORIES if any(v["category"] == c for v in scored.values())]
    cats += sorted({v["category"] for v in scored.values()} - set(cats))
    per_category = {}
    for c in cats:
        vs = [v for v in scored.values() if v["category"] == c]
        n, correct = sum(v["n"] for v in vs), sum(v["correct"] for v in vs)
        per_category[c] = {"subjects": len(vs), "n": n, "correct": correct,
                           "accuracy": sum(v["accuracy"] for v in vs) / len(vs),
                           "micro_accuracy": correct / n}
    n, correct = sum(v["n"] for v in scored.values()), sum(v["correct"] for v in scored.values())
    overall: dict[str, Any] = {"subjects": len(scored), "n": n, "correct": correct,
                               "accuracy": (sum(v["accuracy"] for v in scored.values()) / len(scored))
                               if scored else None,
                               "micro_accuracy": correct / n if n else None}
    if n:
        chance = sum(v["chance"] * v["n"] for v in scored.values()) / n
        lo, hi = chance_interval(chance, n)
        letters = [r["pred"] for r in records if r["correct"] is not None]
        overall.update(chance=chance, chance_interval_95=[lo, hi],
                       within_chance=bool(lo <= overall["micro_accuracy"] <= hi),
                       pred_distribution={L: letters.count(L) for L in sorted(set(letters))})
    return {"overall": overall, "per_category": per_category, "per_subject": per_subject,
            "skipped_rows": sum(s.skipped for s in subjects),
            "unanswered_questions": sum(1 for r in records if r["correct"] is None)}


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def results_table(summary: dict, title: str = "C-Eval"):
    """A rich table: one row per subject, then one per category, then the average."""
    t = Table(title=title)
    for col, kw in (("subject", {}), ("category", {}), ("n", {"justify": "right"}),
                    ("accuracy %", {"justify": "right"})):
        t.add_column(col, **kw)
    for name, v in sorted(summary["per_subject"].items(), key=lambda kv: (kv[1]["category"], kv[0])):
        t.add_row(f"{name} {v['name_zh']}".strip(), v["category"], str(v["n"]), _fmt(v["accuracy"]))
    t.add_section()
    for c, v in summary["per_category"].items():
        t.add_row(f"[b]{c}[/b] ({v['subjects']} subjects)", c, str(v["n"]), _fmt(v["accuracy"]))
    o = summary["overall"]
    t.add_section()
    t.add_row(f"[b]Average[/b] ({o['subjects']} subjects)", "", str(o["n"]), _fmt(o["accuracy"]))
    return t


def summary_rows(summary: dict) -> list[dict]:
    """Flat rows (subject, category, overall) for the CSV file."""
    rows = [{"level": "subject", "name": k, "name_zh": v["name_zh"], "category": v["category"], "n": v["n"],
             "correct": v["correct"], "accuracy": v["accuracy"]} for k, v in summary["per_subject"].items()]
    rows += [{"level": "category", "name": k, "name_zh": "", "category": k, "n": v["n"], "correct": v["correct"],
              "accuracy": v["accuracy"]} for k, v in summary["per_category"].items()]
    o = summary["overall"]
    rows.append({"level": "overall", "name": "Average", "name_zh": "", "category": "", "n": o["n"],
                 "correct": o["correct"], "accuracy": o["accuracy"]})
    return rows


def write_results(out_dir: str | Path, summary: dict, records: Sequence[dict], cfg: CEvalConfig) -> dict:
    """results.json, results.csv, predictions.csv and, when answers are missing, submission.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "predictions": out / "predictions.csv"}
    doc = {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()}, **summary}
    paths["json"].write_text(json.dumps(doc, ensure_ascii=False, indent=1), encoding="utf-8")
    pd.DataFrame(summary_rows(summary)).to_csv(paths["csv"], index=False)
    pd.DataFrame(list(records)).to_csv(paths["predictions"], index=False, quoting=csv.QUOTE_NONNUMERIC)
    if any(r["correct"] is None for r in records):
        sub: dict[str, dict[str, str]] = {}
        for r in records:
            if r["correct"] is None:
                sub.setdefault(r["subject"], {})[r["id"]] = r["pred"]
        paths["submission"] = out / "submission.json"
        paths["submission"].write_text(json.dumps(sub, ensure_ascii=False, indent=1), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------------------------- entry
def _subject_list(value) -> Optional[list[str]]:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(s).strip() for s in value]


def run_ceval(cfg: CEvalConfig, model=None, tokenizer=None, progress: bool = True) -> dict:
    """Evaluate (loading ``cfg.model_dir`` unless a model and tokenizer are given); returns the summary."""
    torch.set_num_threads(max(1, cfg.num_threads))
    if model is None or tokenizer is None:
        model_dir = Path(cfg.model_dir)
        if not model_dir.is_absolute() and not model_dir.exists():
            model_dir = PROJECT_ROOT / model_dir
        model, tokenizer = load_model_folder(model_dir, device=cfg.device)
    subjects = load_split(cfg.data_dir, cfg.split, _subject_list(cfg.subjects))
    dev = None
    if cfg.k_shot > 0:
        if not (Path(cfg.data_dir) / "dev").is_dir():  # never take shots from the questions being scored
            raise FileNotFoundError(f"--k_shot={cfg.k_shot} needs solved examples in {Path(cfg.data_dir) / 'dev'}")
        dev = {s.name: s for s in load_split(cfg.data_dir, "dev")}
    records = score_questions(model, tokenizer, subjects, dev, cfg, progress=progress)
    summary = summarize(records, subjects)
    console = Console()
    if cfg.show_table:
        console.print(results_table(summary, title=f"C-Eval-style {cfg.split}, {cfg.k_shot}-shot, {cfg.mode}"))
    if summary["skipped_rows"]:
        console.print(f"[yellow]skipped {summary['skipped_rows']} malformed row(s) "
                      f"(empty question/option or answer not an option letter)")
    if cfg.out_dir:
        paths = write_results(cfg.out_dir, summary, records, cfg)
        summary["files"] = {k: str(v) for k, v in paths.items()}
        console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return summary


def main(**overrides):
    """CLI: ``python eval/c_eval.py --model_dir DIR --data_dir DIR --split val --k_shot 0 --mode logits``."""
    cfg = make_config(CEvalConfig, **overrides)
    summary = run_ceval(cfg)
    o = summary["overall"]
    print(json.dumps({"subjects": o["subjects"], "n": o["n"], "accuracy": o["accuracy"],
                      "micro_accuracy": o["micro_accuracy"], "categories":
                      {k: v["accuracy"] for k, v in summary["per_category"].items()},
                      "unanswered_questions": summary["unanswered_questions"]}, ensure_ascii=False))


if __name__ == "__main__":
    import fire
    fire.Fire(main)
