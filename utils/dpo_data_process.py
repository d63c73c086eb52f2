"""Preference data for DPO: prompt / chosen / rejected parquet files.

Two ways in, as in the reference project:

* ``build``: read the public preference formats (``../shared/data/dpo``: LLaMA-Factory and MedicalGPT files)
  and normalise them;
* ``generate``: take prompt/response data, keep the curated response as ``chosen`` and let the SFT model write
  ``rejected`` (greedy, batched, sorted by length so batches pad little).

Both drop pairs with an empty field, pairs whose chosen equals rejected, exact duplicates, and pairs over the
token budget (prompt over ``max_source_len`` or a response over ``max_target_len`` tokens, ``[EOS]`` included),
and report every count. The raw formats are read by the data pipeline's ``utils/readers.read_dpo``, so a
multi-turn record becomes one prompt exactly as multi-turn SFT data does.

    python utils/dpo_data_process.py build --inputs=../shared/data/dpo --tokenizer_dir=model_save/sft
    python utils/dpo_data_process.py generate --sft_model_dir=model_save/sft --input_file=data/x.parquet
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pandas as pd
from rich.console import Console
from rich.table import Table

from config import DPOConfig
from model.progress import track
from model.tokenizer.build import load_tokenizer
from model.data.sources import expand_path, iter_records
from utils.readers import Bad, _dpo_from_record, read_dpo

DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
_DEFAULT = DPOConfig()


# ------------------------------------------------------------------------------------------- reading
def data_files(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """The .json/.jsonl/.parquet files of the given files and folders (folders searched recursively)."""
    if isinstance(inputs, (str, Path)):
        inputs = [p for p in str(inputs).split(",") if p]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if str(item).startswith("hf:") or any(c in str(item) for c in "*?["):  # a datasets source, a glob
            files += [x if x.startswith("hf:") else Path(x) for x in expand_path(str(item))]
        elif p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in DATA_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"preference input {p} does not exist")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} files under {', '.join(map(str, inputs))}")
    return files


def load_records(path: str | Path) -> list[dict]:
    """All records of a JSON array, JSON-lines (whatever the suffix says) or parquet file."""
    p = Path(path)
    if p.suffix == ".parquet":
        return pd.read_parquet(p).to_dict("records")
    text = p.read_text(encoding="utf-8-sig")
    if text.lstrip().startswith("["):
        try:
            return [r for r in json.loads(text) if isinstance(r, dict)]
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not valid JSON ({e})") from e
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not a JSON line ({e})") from e
    return records


def iter_preference_pairs(path: str | Path, counts: Optional[Counter] = None) -> Iterator[dict]:
    """Pairs of one file, through the data pipeline's reader (utils/readers.read_dpo, so multi-turn prompts are
    joined exactly as in the SFT data); parquet files need prompt/chosen/rejected columns. Malformed records are
    skipped and counted under ``bad_record``; a file with no usable record is an error naming the first problem.
    """
    counts = counts if counts is not None else Counter()
    p = Path(path)
    first_error, good = None, 0
    if str(path).startswith("hf:") or p.suffix == ".csv":  # a datasets source (model/data/sources.py)
        source = _any_source_pairs(str(path))
        p = Path(str(path).replace("/", "_"))  # its name in the "source" column
    elif p.suffix == ".parquet":
        df = pd.read_parquet(p)
        missing = [c for c in ("prompt", "chosen", "rejected") if c not in df.columns]
        if missing:
            raise ValueError(f"{p}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
        source = ({"prompt": a, "chosen": b, "rejected": c} for a, b, c in zip(df.prompt, df.chosen, df.rejected))
    else:
        source = read_dpo(str(p))
    for rec in source:
        counts["read"] += 1
        if isinstance(rec, Bad):
            counts["bad_record"] += 1
            first_error = first_error or f"{rec.loc}: {rec.reason} {rec.detail}".strip()
            continue
        fields = rec if isinstance(rec, dict) else rec.fields
        if not all(isinstance(fields.get(k), str) for k in ("prompt", "chosen", "rejected")):
            counts["skipped_empty"] += 1  # null / non-text field (parquet)
            continue
        good += 1
        yield {"prompt": fields["prompt"], "chosen": fields["chosen"], "rejected": fields["rejected"],
               "source": p.name}
    if counts["read"] and not good and first_error:
        raise ValueError(f"{p}: no record matches a preference schema; first problem: {first_error}")


def _any_source_pairs(spec: str) -> Iterator:
    """Records of a datasets source or a .csv file through read_dpo's schemas (model/data/sources.py reads them)."""
    for where, rec, err in iter_records(spec):
        if err is not None or not isinstance(rec, dict):
            yield Bad("invalid_json", where, err or "not a record")
            continue
        try:
            yield _dpo_from_record(rec)
        except KeyError as e:
            yield Bad("missing_field", where, f"no {e.args[0]!r}")
        except (ValueError, TypeError, AttributeError) as e:
            yield Bad("invalid_json", where, str(e))


# ----------------------------------------------------------------------------------------- filtering
def filter_pairs(rows: list[dict], tokenizer, max_source_len: int, max_target_len: int,
                 counts: Counter, batch_size: int = 512) -> list[dict]:
    """Drop empty fields, chosen == rejected, exact duplicates and pairs over the token budget (counted)."""
    kept, seen = [], set()
    for r in rows:
        r = {**r, "prompt": r["prompt"].strip(), "chosen": r["chosen"].strip(), "rejected": r["rejected"].strip()}
        if not (r["prompt"] and r["chosen"] and r["rejected"]):
            counts["skipped_empty"] += 1
        elif r["chosen"] == r["rejected"]:
            counts["skipped_same"] += 1
        elif (key := (r["prompt"], r["chosen"], r["rejected"])) in seen:
            counts["skipped_duplicate"] += 1
        else:
            seen.add(key)
            kept.append(r)
    out = []
    for k in range(0, len(kept), batch_size):
        chunk = kept[k:k + batch_size]
        lp = _token_lengths(tokenizer, [r["prompt"] for r in chunk])
        lc = _token_lengths(tokenizer, [r["chosen"] for r in chunk])
        lr = _token_lengths(tokenizer, [r["rejected"] for r in chunk])
        for r, a, b, c in zip(chunk, lp, lc, lr):
            if a > max_source_len or b > max_target_len or c > max_target_len:
                counts["skipped_too_long"] += 1
            else:
                out.append(r)
    counts["kept"] += len(out)
    return out


def _token_lengths(tokenizer, texts: list[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]


def split_by_prompt(rows: list[dict], valid_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic train/valid split on a hash of the prompt, so one prompt never lands on both sides.

    A small set whose hashes all fall above ``valid_ratio`` still holds out its lowest-hash prompt (when it has
    two prompts or more), so asking for held-out pairs always gives some.
    """
    if valid_ratio <= 0:
        return rows, []
    hashes = [int(hashlib.md5(f"{seed}:{r['prompt']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF for r in rows]
    cut = valid_ratio
    if len({r["prompt"] for r in rows}) >= 2 and not any(h < cut for h in hashes):
        cut = min(hashes) + 1e-12
    train, valid = [], []
    for r, h in zip(rows, hashes):
        (valid if h < cut else train).append(r)
    return train, valid


def _write(rows: list[dict], path: Path, columns=("prompt", "chosen", "rejected")) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([{c: r[c] for c in columns} for r in rows], columns=list(columns)).to_parquet(path, index=False)


def _print_report(title: str, per_file: dict[str, Counter]) -> None:
    cols = {"read": "read", "bad_record": "bad", "skipped_empty": "empty", "skipped_same": "same",
            "skipped_duplicate": "dup", "skipped_too_long": "too long", "kept": "kept"}
    table = Table(title=title)
    table.add_column("file")
    for c in cols.values():
        table.add_column(c, justify="right")
    total = Counter()
    for name, c in per_file.items():
        total.update(c)
        table.add_row(Path(name).name, *[str(c.get(k, 0)) for k in cols])
    table.add_row("[bold]total", *[f"[bold]{total.get(k, 0)}" for k in cols])
    Console(stderr=True).print(table)


# ------------------------------------------------------------------------------------------- build
def build(inputs: str = "../shared/data/dpo", tokenizer_dir: str = "model_save/sft",
          out_dir: str = "data/generated/dpo", max_source_len: int = _DEFAULT.max_source_len,
          max_target_len: int = _DEFAULT.max_target_len, valid_ratio: float = 0.1, seed: int = 23333) -> dict:
    """Normalise preference files into ``my_dpo_train.parquet`` / ``my_dpo_valid.parquet`` + a report.

    Duplicates are removed across files (MedicalGPT ships the same pairs in two schemas).
    """
    tokenizer = load_tokenizer(tokenizer_dir)
    per_file: dict[str, Counter] = {}
    seen: set = set()
    kept: list[dict] = []
    for f in data_files(inputs):
        c = per_file.setdefault(str(f), Counter())
        rows = list(iter_preference_pairs(f, c))
        rows = filter_pairs(rows, tokenizer, max_source_len, max_target_len, c)
        for r in rows:  # cross-file duplicates
            key = (r["prompt"], r["chosen"], r["rejected"])
            if key in seen:
                c["skipped_duplicate"] += 1
                c["kept"] -= 1
            else:
                seen.add(key)
                kept.append(r)
    train, valid = split_by_prompt(kept, valid_ratio, seed)
    out = Path(out_dir)
    _write(train, out / "my_dpo_train.parquet")
    if valid:
        _write(valid, out / "my_dpo_valid.parquet")
    report = {"files": {k: dict(v) for k, v in per_file.items()}, "train": len(train), "valid": len(valid),
              "max_source_len": max_source_len, "max_target_len": max_target_len,
              "train_file": str(out / "my_dpo_train.parquet"),
              "valid_file": str(out / "my_dpo_valid.parquet") if valid else None}
    (out / "dpo_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=1), encoding="utf-8")
    _print_report(f"preference pairs -> {out} (train {len(train)}, valid {len(valid)})", per_file)
    return report


# ---------------------------------------------------------------------------------------- generate
def read_prompt_answer(path: str | Path, counts: Counter, limit: int = 0) -> list[dict]:
    """prompt/response rows (parquet or JSON with those columns; ``chosen`` is accepted for ``response``);
    ``limit`` > 0 reads only the first rows."""
    p = Path(path)
    if str(path).startswith("hf:") or not p.is_file() or p.suffix not in (".parquet", ".json", ".jsonl"):
        return _rows_from_sources(path, counts, limit)
    if p.suffix == ".parquet":
        df = pd.read_parquet(p)
    else:
        df = pd.DataFrame(load_records(p))
    answer = "response" if "response" in df.columns else ("chosen" if "chosen" in df.columns else None)
    if "prompt" not in df.columns or answer is None:
        return _rows_from_sources(path, counts, limit)  # completion, alpaca or messages columns
    if limit > 0:
        df = df.head(limit)
    rows = []
    for prompt, resp in zip(df["prompt"], df[answer]):
        counts["read"] += 1
        if not isinstance(prompt, str) or not isinstance(resp, str) or not prompt.strip() or not resp.strip():
            counts["skipped_empty"] += 1
            continue
        rows.append({"prompt": prompt.strip(), "chosen": resp.strip()})
    return rows


def _rows_from_sources(spec, counts: Counter, limit: int = 0) -> list[dict]:
    """prompt/response rows of any training source (model/data/sources.py: globs, folders, .csv, datasets sources;
    completion, alpaca and messages columns)."""
    from model.data.sources import iter_source_rows, open_sources
    rows = []
    for src in open_sources(spec):
        if src.kind != "pairs":
            raise ValueError(f"{src.path}: needs prompt/response rows, found {src.schema} rows")
        for _, chunk, _ in iter_source_rows(src):
            for prompt, resp in chunk:
                if limit > 0 and counts["read"] >= limit:
                    return rows
                counts["read"] += 1
                if not prompt.strip() or not resp.strip():
                    counts["skipped_empty"] += 1
                    continue
                rows.append({"prompt": prompt.strip(), "chosen": resp.strip()})
    return rows


def generate_rejected(model, tokenizer, prompts: list[str], batch_size: int = 32, max_new_tokens: int = 128,
                      max_source_len: int = 256, show_progress: bool = True) -> list[str]:
    """Greedy answers of the SFT model for every prompt, in batches of similar length; order preserved."""
    import torch  # torch and transformers load only for generation, not for `build`

    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
    out: list[str] = [""] * len(prompts)
    model.eval()
    for b in track(batches, "generating rejected answers", enabled=show_progress):
        enc = tokenizer([prompts[i] for i in b], padding=True, truncation=True, max_length=max_source_len,
                        return_tensors="pt")
        with torch.no_grad():
            ids = model.my_generate(enc["input_ids"].to(device), enc["attention_mask"].to(device),
                                    max_new_tokens=max_new_tokens, search_type="greedy")
        for i, text in zip(b, tokenizer.batch_decode(ids, skip_special_tokens=True)):
            out[i] = text.strip()
    return out


def generate(sft_model_dir: str = "model_save/sft", input_file: str = "data/generated/all/sft_valid.parquet",
             out_file: str = "data/generated/dpo/my_dpo_generated.parquet", batch_size: int = 32,
             max_new_tokens: int = 128, max_source_len: int = _DEFAULT.max_source_len,
             max_target_len: int = _DEFAULT.max_target_len, limit: int = 0, device: str = "auto",
             num_threads: int = 0) -> dict:
    """prompt/response data -> prompt/chosen/rejected with ``rejected`` written by the SFT model (greedy)."""
    import torch  # torch and transformers load only for generation, not for `build`
    from transformers.utils import logging as hf_logging

    from model.data.checkpoint import load_model_folder
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    hf_logging.disable_progress_bar()
    model, tokenizer = load_model_folder(sft_model_dir, device=device)
    counts: Counter = Counter()
    rows = read_prompt_answer(input_file, counts, limit)
    # Prompts over the budget are dropped before generating: no time spent on pairs that would be thrown away.
    lens = _token_lengths(tokenizer, [r["prompt"] for r in rows])
    too_long = sum(1 for n in lens if n > max_source_len)
    rows = [r for r, n in zip(rows, lens) if n <= max_source_len]
    rejected = generate_rejected(model, tokenizer, [r["prompt"] for r in rows], batch_size, max_new_tokens,
                                 max_source_len)
    for r, rej in zip(rows, rejected):
        r["rejected"] = rej
    kept = filter_pairs(rows, tokenizer, max_source_len, max_target_len, counts)
    counts["skipped_too_long"] += too_long
    _write(kept, Path(out_file))
    _print_report(f"generated preference pairs -> {out_file}", {str(input_file): counts})
    return {"out_file": str(out_file), **dict(counts)}


def _cli_build(**kw) -> None:
    build(**kw)


def _cli_generate(**kw) -> None:
    generate(**kw)


if __name__ == "__main__":
    import fire
    _cli_build.__doc__, _cli_generate.__doc__ = build.__doc__, generate.__doc__
    fire.Fire({"build": _cli_build, "generate": _cli_generate})
