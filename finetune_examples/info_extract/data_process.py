"""Triple-extraction data: DuIE 2.0 and SKE (DuIE 1.0) files to prompt/response parquet.

Formats read (detected per line):
* DuIE 2.0 JSON lines: ``{"text", "spo_list": [{"subject", "predicate", "object": {"@value": ...}}]}``; the
  extra slots of complex objects (``inWork``, ``onDate`` ...) are dropped, as in the reference;
* SKE / DuIE 1.0 JSON lines: the same with ``"object": "..."`` (plus ``postag``);
* a JSON array of such records, and ``text || [spo, ...]`` lines.

The reference's text format: prompt ``请抽取出给定句子中的所有三元组。给定句子：<text>``, response
``[(s,p,o),(s,p,o)]`` (duplicates removed, order kept).

    python finetune_examples/info_extract/data_process.py \
        --train_file ../shared/data/ie/duie/duie_train.json --dev_file ../shared/data/ie/duie/duie_dev.json \
        --out_dir data/generated/ie
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import pandas as pd
from rich.console import Console

from finetune_examples.info_extract.augment import augment
from model.data.sources import iter_records as iter_any_records
from model.tokenizer.build import load_tokenizer

PROMPT_PREFIX = "请抽取出给定句子中的所有三元组。给定句子："
Triple = tuple[str, str, str]


def make_prompt(text: str) -> str:
    return PROMPT_PREFIX + text


def format_triples(triples: list[Triple]) -> str:
    """``[(s,p,o),(s,p,o)]``: the reference's response text."""
    return "[" + ",".join(f"({s},{p},{o})" for s, p, o in triples) + "]"


@dataclass
class ReadStats:
    """What was read and what was left out, per reason, so nothing is dropped silently."""

    rows: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    bad_triples: int = 0
    duplicate_triples: int = 0
    first_errors: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{where}: {reason}")


def _object_value(obj) -> Optional[str]:
    if isinstance(obj, dict):
        obj = obj.get("@value")
    return obj if isinstance(obj, str) else None


def spo_to_triples(spo_list, stats: Optional[ReadStats] = None) -> list[Triple]:
    """Triples of one record, stripped and de-duplicated (first occurrence kept)."""
    out: list[Triple] = []
    for spo in spo_list or []:
        if not isinstance(spo, dict):
            if stats:
                stats.bad_triples += 1
            continue
        s, p, o = spo.get("subject"), spo.get("predicate"), _object_value(spo.get("object"))
        if not all(isinstance(x, str) and x.strip() for x in (s, p, o)):
            if stats:
                stats.bad_triples += 1
            continue
        t = (s.strip(), p.strip(), o.strip())
        if t in out:
            if stats:
                stats.duplicate_triples += 1
            continue
        out.append(t)
    return out


def _parse_line(line: str):
    line = line.strip()
    if line.startswith("{"):
        return json.loads(line)
    if "||" in line:  # text || spo_list
        text, spo = line.split("||", 1)
        return {"text": text.strip(), "spo_list": json.loads(spo.strip())}
    raise ValueError("neither a JSON object nor a `text || spo_list` line")


def iter_records(path: str | Path):
    """Raw records with a location string: JSON lines, `||` lines, or one JSON array; also globs, folders,
    .csv/.parquet files and ``datasets`` sources (``hf:NAME[:SPLIT][?...]``, see model/data/sources.py)."""
    if str(path).startswith("hf:") or any(c in str(path) for c in "*?[,") or Path(path).is_dir() \
            or Path(path).suffix in (".csv", ".parquet"):
        yield from iter_any_records(str(path))
        return
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with path.open(encoding="utf-8-sig") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == "[":
            for i, rec in enumerate(json.load(f)):
                yield f"{path}:record {i}", rec, None
            return
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{i}", _parse_line(line), None
            except (ValueError, json.JSONDecodeError) as e:
                yield f"{path}:{i}", None, f"unreadable line ({str(e)[:60]})"


def read_ie_file(path: str | Path, stats: Optional[ReadStats] = None,
                 keep_empty: bool = False) -> Iterator[tuple[str, list[Triple]]]:
    """(text, triples) per usable record; bad rows are counted in ``stats`` by reason."""
    stats = stats if stats is not None else ReadStats()
    for where, rec, err in iter_records(path):
        stats.rows += 1
        if err:
            stats.skip(err, where)
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str) or not rec["text"].strip():
            stats.skip("no text field", where)
            continue
        if not isinstance(rec.get("spo_list", []), list):
            stats.skip("spo_list is not a list", where)
            continue
        triples = spo_to_triples(rec.get("spo_list"), stats)
        if not triples and not keep_empty:
            stats.skip("no valid triple", where)
            continue
        stats.kept += 1
        yield rec["text"].strip(), triples


def in_sentence_order(text: str, triples: list[Triple]) -> list[Triple]:
    """Triples ordered by where their subject, then their object, first appears in the sentence.

    The files list a sentence's triples in no particular order; one fixed order gives the model one answer to
    learn instead of many permutations of it.
    """
    def where(name: str) -> int:
        i = text.find(name)
        return i if i >= 0 else len(text)
    return sorted(triples, key=lambda t: (where(t[0]), where(t[2])))


def to_frame(path: str | Path, stats: Optional[ReadStats] = None, keep_empty: bool = False,
             tokenizer=None, max_source_len: Optional[int] = None,
             max_target_len: Optional[int] = None, sentence_order: bool = False) -> pd.DataFrame:
    """prompt/response rows; with a tokenizer, rows longer than the token limits are dropped (and counted)."""
    stats = stats if stats is not None else ReadStats()
    return pairs_frame(read_ie_file(path, stats, keep_empty), stats, str(path), tokenizer, max_source_len,
                       max_target_len, sentence_order)


def pairs_frame(pairs: Iterable[tuple[str, list[Triple]]], stats: ReadStats, where: str, tokenizer=None,
                max_source_len: Optional[int] = None, max_target_len: Optional[int] = None,
                sentence_order: bool = False) -> pd.DataFrame:
    """prompt/response rows from (text, triples) pairs, dropping (and counting) rows over the token limits.

    Dropping beats truncating here: a cut response teaches the model to stop mid-triple.
    """
    rows = []
    for text, triples in pairs:
        if sentence_order:
            triples = in_sentence_order(text, triples)
        prompt, response = make_prompt(text), format_triples(triples)
        if tokenizer is not None:
            if max_source_len and len(tokenizer(prompt)["input_ids"]) > max_source_len:
                stats.skip(f"prompt over {max_source_len} tokens", where)
                stats.kept -= 1
                continue
            if max_target_len and len(tokenizer(response)["input_ids"]) > max_target_len:
                stats.skip(f"response over {max_target_len} tokens", where)
                stats.kept -= 1
                continue
        rows.append({"prompt": prompt, "response": response})
    return pd.DataFrame(rows, columns=["prompt", "response"])


def report(stats: ReadStats, name: str) -> str:
    skipped = sum(stats.skipped.values())
    msg = f"{name}: {stats.rows} rows, {stats.kept} kept, {skipped} skipped"
    if stats.skipped:
        msg += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(stats.skipped.items())) + ")"
    if stats.bad_triples or stats.duplicate_triples:
        msg += f"; {stats.bad_triples} malformed and {stats.duplicate_triples} duplicate triples dropped"
    return msg


def process(train_file: str, dev_file: Optional[str] = None, out_dir: str = "data/generated/ie",
            tokenizer_dir: Optional[str] = None, max_source_len: int = 256, max_target_len: int = 256,
            valid_size: int = 200, keep_empty: bool = False, seed: int = 23333,
            augment_copies: int = 0, sentence_order: bool = False) -> dict[str, str]:
    """Write ``train.parquet``, ``valid.parquet`` (held out from train) and ``dev.parquet`` (the test set).

    The dev file stays untouched for the final P/R/F1; ``valid.parquet`` is what the trainer watches.
    ``augment_copies`` adds that many entity-swapped versions of each training sentence (``augment.py``),
    built from the training part only, so nothing of valid or dev leaks in. ``sentence_order`` writes each
    training and valid response in sentence order (``in_sentence_order``); the dev references keep theirs (the
    scores compare sets).
    """
    console = Console()
    tok = None
    if tokenizer_dir:
        tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    pairs = list(read_ie_file(train_file, stats, keep_empty))
    df = pairs_frame(pairs, stats, str(train_file), tok, max_source_len, max_target_len, sentence_order)
    console.print(report(stats, str(train_file)))
    if df.empty:
        raise ValueError(f"{train_file}: no usable rows ({'; '.join(stats.first_errors)})")
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    n_valid = min(valid_size, len(df) // 10) if valid_size > 0 else 0
    paths = {"train": out / "train.parquet"}
    train = df.iloc[n_valid:]
    if augment_copies > 0:
        train = pd.concat([train, swapped_rows(pairs, set(train["prompt"]), augment_copies, seed, tok,
                                               max_source_len, max_target_len, sentence_order, console)],
                          ignore_index=True)
        train = train.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    train.to_parquet(paths["train"], index=False)
    if n_valid:
        paths["valid"] = out / "valid.parquet"
        df.iloc[:n_valid].to_parquet(paths["valid"], index=False)
    if dev_file:
        dstats = ReadStats()
        # the test set keeps every row: no token filter, so the scores cover the whole dev file
        dev = to_frame(dev_file, dstats, keep_empty)
        console.print(report(dstats, str(dev_file)))
        paths["dev"] = out / "dev.parquet"
        dev.to_parquet(paths["dev"], index=False)
    console.print("wrote " + ", ".join(f"{k}: {p}" for k, p in paths.items()))
    return {k: str(v) for k, v in paths.items()}


def swapped_rows(pairs: list[tuple[str, list[Triple]]], prompts: set[str], copies: int, seed: int, tokenizer,
                 max_source_len: int, max_target_len: int, sentence_order: bool, console: Console) -> pd.DataFrame:
    """Entity-swapped rows of the (text, triples) ``pairs`` whose prompts are in ``prompts`` (the training part)."""
    pairs = [(t, tr) for t, tr in pairs if make_prompt(t) in prompts]
    swapped, failed = augment(pairs, copies, seed)
    stats = ReadStats(rows=len(swapped), kept=len(swapped))
    rows = pairs_frame(swapped, stats, "entity swaps", tokenizer, max_source_len, max_target_len, sentence_order)
    console.print(f"entity swaps: {len(rows):,} rows added ({copies} per sentence; {failed:,} found no clean "
                  f"renaming, {len(swapped) - len(rows):,} over the token limits)")
    return rows


def main(**kw) -> None:
    process(**kw)


if __name__ == "__main__":
    import fire
    fire.Fire(main)
