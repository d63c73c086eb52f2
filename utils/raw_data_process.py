"""Raw corpora -> clean, deduplicated parquet, streaming at bounded memory.

    python utils/raw_data_process.py --config data/sources/shared_all.yaml --output_dir data/generated/all
    python -m utils.raw_data_process --config data/sources/demo.yaml --output_dir data/generated/demo
    python -m utils.raw_data_process --config data/sources/shared_all.yaml --max_rows_per_source 200

A YAML/JSON config lists sources; each names its reader (``utils/readers.py``), path glob(s), encoding, field
mapping, cleaning options, filters and length limits (``PRESETS`` holds the reference's named sources).
Rows stream through: read -> map -> clean -> filter -> exact dedup -> near dedup -> write.  Outputs in
``output_dir``:

* ``my_train_dataset.parquet``, ``my_valid_dataset.parquet``, ``my_test_dataset.parquet`` (``prompt``,
  ``response``): SFT rows and prompt/response pairs made from prose, split at random (seeded) and shuffled
  through on-disk buckets (memory: one bucket);
* ``my_text_dataset.parquet`` (``text``, ``title``, ``source``): the prose rows of the train split (pretraining
  text); ``my_valid_text.parquet`` and ``my_test_text.parquet``: held-out prose. A prose row and the pair made
  from it share one split, so nothing held out is ever trained on;
* ``my_corpus.txt``: plain text of the train split (and DPO/IE rows) for the tokenizer, one document per line;
* ``my_dpo_dataset.parquet`` (``prompt``, ``chosen``, ``rejected``), ``my_ie_dataset.parquet`` (``text``,
  ``triples`` as JSON);
* ``report.json``: per source rows read / kept / dropped by reason, bad-row details and first locations,
  characters in and out; ``samples.json``: 50 kept rows drawn at random for reading; the log.
"""
from __future__ import annotations

import copy
import fnmatch
import glob
import json
import logging
import os
import random
import re
import resource
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ujson
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config import data_stage_defaults, data_stage_help, run_cli
from model.data.sources import normalize_turns
from model.prompt import join_history
from utils.dedup import DropDatasetDuplicate, ExactDeduper
from utils.readers import Bad, Rec, SourceFileError, conversation_to_pairs, get_reader
from utils.text_cleaning import CleanOptions, clean_text, split_sentences, title_desc_prompt

__all__ = ["run_pipeline", "load_config", "PRESETS", "DROP_REASONS", "main"]

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("raw_data_process")

DROP_REASONS = ("bad_row", "too_short", "too_long", "filter", "exact_dup", "near_dup")
ROLES = ("pretrain", "sft", "dpo", "ie")

# The reference's question templates for Wikipedia articles (title -> article): used by the zhwiki preset and
# for the cmrc2018 Wikipedia paragraphs in the shipped config.
WIKI_TITLE_TEMPLATES = [
    "什么是{title}？", "介绍一下{title}", "介绍一下什么是{title}", "写一篇关于{title}的介绍", "{title}是什么？",
    "你知道{title}吗？", "生成关于{title}的介绍", "我想知道关于{title}的详细信息", "你了解{title}吗？",
    "请解释一下{title}", "对于{title}，你有什么了解或看法吗？", "请告诉我关于{title}的信息",
    "请简要描述一下{title}", "请提供有关{title}的一些详细信息", "能否解释一下{title}是什么？",
    "请分享一些关于{title}的背景知识", "请简要概括一下{title}", "能给我一些关于{title}的背景资料吗？",
    "有关{title}的信息可以分享一下吗？", "你能告诉我{title}是什么吗？",
]

# The reference project's named sources, in their published schemas.
PRESETS: dict[str, dict] = {
    # webtext2019zh (社区问答): JSON lines {qid,title,desc,topic,star,content,answer_id,answerer_tags}
    "webtext2019zh": {"role": "sft", "reader": "jsonl", "prompt": {"title_desc": ["title", "desc?"]},
                      "response": "content", "filters": [{"field": "star", "op": ">=", "value": 5}],
                      "response_min_chars": 10, "clean": {"html": True}},
    # baike_qa2019 (百科问答): JSON lines {qid,category,title,desc,answer}
    "baike_qa2019": {"role": "sft", "reader": "jsonl", "prompt": {"title_desc": ["title", "desc?"]},
                     "response": "answer", "prompt_min_chars": 3, "response_min_chars": 15, "clean": {"html": True}},
    # Chinese medical dialogue CSVs (department,title,ask,answer), GB18030
    "medical_dialogue": {"role": "sft", "reader": "csv", "encoding": "gb18030",
                         "prompt": {"title_desc": ["title", "ask"], "prefer": "desc"}, "response": "answer",
                         "prompt_min_chars": 3, "response_min_chars": 15},
    # Zhihu-KOL parquet {INSTRUCTION, RESPONSE, SOURCE, METADATA}
    "zhihu_kol": {"role": "sft", "reader": "parquet", "prompt": "INSTRUCTION", "response": "RESPONSE",
                  "prompt_min_chars": 4, "response_min_chars": 10, "clean": {"html": True}},
    # BELLE (train_2M_CN, Belle_open_source_1M ...): JSON lines {instruction,input,output}
    "belle": {"role": "sft", "reader": "json", "prompt": ["instruction", "input?"], "response": "output",
              "response_min_chars": 15},
    # zhwiki extracted by wikiextractor: <doc ... title="..."> blocks or --json lines
    "zhwiki": {"role": "pretrain", "reader": "wikiextractor", "text": "text", "title": "title", "pairs": "title",
               "title_templates": WIKI_TITLE_TEMPLATES},
    # alpaca-gpt4-data-zh: a JSON array of {instruction,input,output}
    "alpaca_gpt4_zh": {"role": "sft", "reader": "json", "prompt": ["instruction", "input?"], "response": "output"},
}

DEFAULTS: dict[str, Any] = data_stage_defaults()  # config.py DataStageConfig, field by field with help

PARQUET_SCHEMAS = {
    "split": pa.schema([("prompt", pa.string()), ("response", pa.string())]),
    "text": pa.schema([("text", pa.string()), ("title", pa.string()), ("source", pa.string())]),
    "dpo": pa.schema([("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string())]),
    "ie": pa.schema([("text", pa.string()), ("triples", pa.string())]),
}


# ============================================================================================ config
def _deep_update(base: dict, upd: dict) -> dict:
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "splits":
            _deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _set_dotted(d: dict, key: str, value):
    parts = key.replace("__", ".").split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value


def load_config(config_path: str | os.PathLike | dict, overrides: dict | None = None) -> dict:
    """Config = DEFAULTS <- file <- overrides (``dedup.workers=2`` style keys allowed); sources get their
    preset and the source defaults filled in."""
    if isinstance(config_path, dict):
        raw, cfg_dir = copy.deepcopy(config_path), Path.cwd()
    else:
        p = Path(config_path)
        if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
            p = ROOT / p
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {config_path}")
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        cfg_dir = p.resolve().parent
    cfg = _deep_update(copy.deepcopy(DEFAULTS), {k: v for k, v in raw.items() if k != "sources"})
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if "." in k or "__" in k:
            _set_dotted(cfg, k, v)
        elif isinstance(v, dict) and isinstance(cfg.get(k), dict):
            _deep_update(cfg[k], v)
        else:
            cfg[k] = v
    cfg["_config_dir"] = str(cfg_dir)
    cfg["_config_path"] = str(config_path) if not isinstance(config_path, dict) else "<dict>"
    sources = []
    names = set()
    for i, s in enumerate(raw.get("sources") or []):
        s = dict(s)
        src = copy.deepcopy(cfg["source_defaults"])
        if s.get("preset"):
            if s["preset"] not in PRESETS:
                raise ValueError(f"source {s.get('name', i)}: unknown preset {s['preset']!r}; known {sorted(PRESETS)}")
            _deep_update(src, PRESETS[s["preset"]])
        _deep_update(src, s)
        name = src.get("name") or f"source_{i}"
        if name in names:
            raise ValueError(f"duplicate source name {name!r}")
        names.add(name)
        src["name"] = name
        if src.get("enabled", True) is False:
            continue
        if src.get("role") not in ROLES:
            raise ValueError(f"source {name}: role must be one of {ROLES}, got {src.get('role')!r}")
        if not src.get("reader"):
            raise ValueError(f"source {name}: no reader")
        get_reader(src["reader"])  # validates the name
        if not src.get("path"):
            raise ValueError(f"source {name}: no path")
        CleanOptions.from_dict(src.get("clean"))  # validates the options
        sources.append(src)
    only = cfg.get("only_sources")
    if only:
        only = [only] if isinstance(only, str) else list(only)
        sources = [s for s in sources if s["name"] in only]
    cfg["sources"] = sources
    total = sum(cfg["splits"].values())
    if not (0.999 <= total <= 1.001) or any(v < 0 for v in cfg["splits"].values()):
        raise ValueError(f"split ratios must be >= 0 and sum to 1, got {cfg['splits']}")
    return cfg


def _resolve_root(cfg: dict) -> Path:
    root = Path(os.path.expanduser(str(cfg["data_root"])))
    if root.is_absolute():
        return root
    for base in (Path.cwd(), ROOT):
        if (base / root).exists():
            return (base / root).resolve()
    return (ROOT / root).resolve()


def _resolve_files(src: dict, root: Path) -> list[str]:
    pats = src["path"] if isinstance(src["path"], list) else [src["path"]]
    files: list[str] = []
    for pat in pats:
        pat = os.path.expanduser(pat)
        full = pat if os.path.isabs(pat) else str(root / pat)
        hits = sorted(glob.glob(full, recursive=True))
        files += [h for h in hits if os.path.isfile(h)]
    excl = src.get("exclude") or []
    excl = [excl] if isinstance(excl, str) else excl
    if excl:
        files = [f for f in files if not any(fnmatch.fnmatch(f, e if os.path.isabs(e) else str(root / e))
                                             or fnmatch.fnmatch(os.path.basename(f), e) for e in excl)]
    seen = set()
    return [f for f in files if not (f in seen or seen.add(f))]


# ============================================================================================ field mapping
class MissingField(KeyError):
    pass


_MISSING = object()
_TEMPLATE_FIELD = re.compile(r"\{([^{}]+)\}")


def _get(rec: dict, name: str):
    cur: Any = rec
    for part in name.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part, _MISSING)
        elif isinstance(cur, list) and part.lstrip("-").isdigit():
            i = int(part)
            cur = cur[i] if -len(cur) <= i < len(cur) else _MISSING
        else:
            return _MISSING
        if cur is _MISSING:
            return _MISSING
    return cur


def _as_text(v) -> str:
    if v is None or v is _MISSING:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "\n".join(_as_text(x) for x in v if _as_text(x))
    if isinstance(v, float) and v != v:
        return ""
    return str(v)


def _field(rec: dict, name: str) -> str:
    optional = name.endswith("?")
    key = name[:-1] if optional else name
    v = _get(rec, key)
    if v is _MISSING or v is None:
        if optional:
            return ""
        raise MissingField(key)
    return _as_text(v)


def render(spec, rec: dict) -> str:
    """Field mapping: ``"name"`` (``"name?"`` optional, dotted paths such as ``instances.0.input``),
    ``"{a}：{b?}"`` template, ``[a, b?]`` (non-empty parts joined by newlines),
    ``{"title_desc": [title, desc], "prefer": "title", "threshold": 0.9}`` (the reference's prompt rule),
    ``{"join": [..], "sep": " "}``."""
    if spec is None:
        return ""
    if isinstance(spec, str):
        if "{" in spec:
            return _TEMPLATE_FIELD.sub(lambda m: _field(rec, m.group(1)), spec)
        return _field(rec, spec)
    if isinstance(spec, list):
        return "\n".join(x for x in (render(s, rec).strip() for s in spec) if x)
    if isinstance(spec, dict):
        if "title_desc" in spec:
            t, d = spec["title_desc"]
            return title_desc_prompt(render(t, rec), render(d, rec), threshold=spec.get("threshold", 0.90),
                                     prefer=spec.get("prefer", "title"))
        if "join" in spec:
            return spec.get("sep", "\n").join(x for x in (render(s, rec).strip() for s in spec["join"]) if x)
        if "template" in spec:
            return render(spec["template"], rec)
    raise ValueError(f"bad field mapping {spec!r}")


_OPS = {
    "==": lambda a, b: a == b, "eq": lambda a, b: a == b, "!=": lambda a, b: a != b, "ne": lambda a, b: a != b,
    ">=": lambda a, b: _num(a) >= b, "ge": lambda a, b: _num(a) >= b, ">": lambda a, b: _num(a) > b,
    "gt": lambda a, b: _num(a) > b, "<=": lambda a, b: _num(a) <= b, "le": lambda a, b: _num(a) <= b,
    "<": lambda a, b: _num(a) < b, "lt": lambda a, b: _num(a) < b, "in": lambda a, b: a in b,
    "not_in": lambda a, b: a not in b, "regex": lambda a, b: re.search(b, _as_text(a)) is not None,
    "not_regex": lambda a, b: re.search(b, _as_text(a)) is None, "nonempty": lambda a, b: bool(_as_text(a).strip()),
}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("-inf")


def _passes(filters: list, rec: dict) -> tuple[bool, str]:
    for f in filters or []:
        v = _get(rec, f["field"])
        op = f.get("op", "==")
        if op not in _OPS:
            raise ValueError(f"unknown filter op {op!r}")
        if v is _MISSING or not _OPS[op](v, f.get("value")):
            return False, f"{f['field']} {op} {f.get('value')!r}"
    return True, ""


# ============================================================================================ statistics
@dataclass
class SourceStats:
    name: str
    role: str
    files: int = 0
    records_read: int = 0
    rows_read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    bad_row_detail: Counter = field(default_factory=Counter)
    filter_detail: Counter = field(default_factory=Counter)
    chars_in: int = 0
    chars_out: int = 0
    pairs_from_prose: int = 0
    examples: dict = field(default_factory=lambda: defaultdict(list))
    error: str | None = None
    seconds: float = 0.0

    def drop(self, reason: str, loc: str, detail: str = "", sub: str | None = None, n_examples: int = 5):
        self.dropped[reason] += 1
        key = sub or reason
        if reason == "bad_row":
            self.bad_row_detail[key] += 1
        elif reason == "filter" and sub:
            self.filter_detail[sub] += 1
        ex = self.examples[key]
        if len(ex) < n_examples:
            ex.append(f"{loc}" + (f" ({detail})" if detail else ""))
            log.warning("%s: %s at %s%s", self.name, key, loc, f": {detail}" if detail else "")

    def as_dict(self) -> dict:
        dropped = {r: int(self.dropped.get(r, 0)) for r in DROP_REASONS}
        return {
            "role": self.role, "files": self.files, "records_read": self.records_read, "rows_read": self.rows_read,
            "kept": self.kept, "dropped": dropped, "dropped_total": sum(dropped.values()),
            "bad_row_detail": dict(self.bad_row_detail), "filter_detail": dict(self.filter_detail),
            "chars_in": self.chars_in, "chars_out": self.chars_out, "pairs_from_prose": self.pairs_from_prose,
            "first_locations": {k: v for k, v in self.examples.items()}, "error": self.error,
            "seconds": round(self.seconds, 2),
            "adds_up": self.rows_read == self.kept + sum(dropped.values()),
        }


# ============================================================================================ writers
class _ParquetSink:
    def __init__(self, path: Path, schema: pa.Schema, flush_rows: int = 8192):
        self.path = path
        self.schema = schema
        self.cols = schema.names
        self.buf: list[dict] = []
        self.flush_rows = flush_rows
        self.rows = 0
        self.writer = pq.ParquetWriter(str(path), schema, compression="zstd")

    def add(self, row: dict):
        self.buf.append(row)
        if len(self.buf) >= self.flush_rows:
            self.flush()

    def flush(self):
        if self.buf:
            table = pa.Table.from_pydict({c: [r.get(c) for r in self.buf] for c in self.cols}, schema=self.schema)
            self.writer.write_table(table)
            self.rows += len(self.buf)
            self.buf = []

    def close(self):
        self.flush()
        self.writer.close()


class _ShuffledSink:
    """Rows go to ``n_buckets`` spill files at random; on close each bucket is shuffled in memory and appended
    to the parquet file (memory: one bucket, about rows/n_buckets)."""

    def __init__(self, path: Path, schema: pa.Schema, tmp_dir: Path, n_buckets: int, rng: random.Random):
        self.path, self.schema, self.rng = path, schema, rng
        self.n = max(1, int(n_buckets))
        self.tmp_dir = tmp_dir
        self.files = [open(tmp_dir / f"{path.stem}.{k}.jsonl", "w", encoding="utf-8") for k in range(self.n)]
        self.rows = 0

    def add(self, row: dict):
        self.files[self.rng.randrange(self.n)].write(ujson.dumps(row, ensure_ascii=False) + "\n")

    def close(self):
        sink = _ParquetSink(self.path, self.schema)
        for k, f in enumerate(self.files):
            f.close()
            p = Path(f.name)
            with open(p, encoding="utf-8") as fr:
                rows = [ujson.loads(line) for line in fr]
            self.rng.shuffle(rows)
            for r in rows:
                sink.add(r)
            del rows
            p.unlink()
        sink.close()
        self.rows = sink.rows


class _Reservoir:
    def __init__(self, k: int, rng: random.Random):
        self.k, self.rng, self.n, self.items = k, rng, 0, []

    def add(self, item):
        self.n += 1
        if len(self.items) < self.k:
            self.items.append(item)
        else:
            j = self.rng.randrange(self.n)
            if j < self.k:
                self.items[j] = item


def text_file_name(split: str, train_split: str = "train") -> str:
    """Prose of the training split is ``my_text_dataset.parquet`` (the pretraining text); held-out prose is
    ``my_<split>_text.parquet``."""
    return "my_text_dataset.parquet" if split == train_split else f"my_{split}_text.parquet"


class Outputs:
    def __init__(self, out_dir: Path, cfg: dict):
        self.out_dir = out_dir
        self.tmp = out_dir / "_tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        seed = int(cfg["seed"])
        self.split_rng = random.Random(seed)
        self.pair_rng = random.Random(seed + 1)
        self.splits = [(k, float(v)) for k, v in cfg["splits"].items()]
        mk = (lambda name: _ShuffledSink(out_dir / name, PARQUET_SCHEMAS["split"], self.tmp, cfg["shuffle_buckets"],
                                         random.Random(seed + 2 + len(name)))) if cfg["shuffle"] else \
            (lambda name: _ParquetSink(out_dir / name, PARQUET_SCHEMAS["split"]))
        self.split_sinks = {k: mk(f"my_{k}_dataset.parquet") for k, _ in self.splits}
        # prose is split like the pairs: held-out rows never reach the pretraining text or the corpus
        self.train_split = "train" if "train" in dict(self.splits) else self.splits[0][0]
        self.text_sinks = {k: _ParquetSink(out_dir / text_file_name(k, self.train_split), PARQUET_SCHEMAS["text"])
                           for k, _ in self.splits}
        self.dpo = _ParquetSink(out_dir / "my_dpo_dataset.parquet", PARQUET_SCHEMAS["dpo"])
        self.ie = _ParquetSink(out_dir / "my_ie_dataset.parquet", PARQUET_SCHEMAS["ie"])
        self.corpus = open(out_dir / "my_corpus.txt", "w", encoding="utf-8")
        self.corpus_lines = 0
        self.corpus_roles = set(cfg["corpus"].get("roles") or [])
        self.corpus_newline = cfg["corpus"].get("newline", "space")
        self.samples = _Reservoir(int(cfg.get("samples", 50)), random.Random(seed + 3))

    def split_of(self) -> str:
        r = self.split_rng.random()
        acc = 0.0
        for k, v in self.splits:
            acc += v
            if r < acc:
                return k
        return self.splits[-1][0]

    def add_pair(self, prompt: str, response: str, split: str):
        self.split_sinks[split].add({"prompt": prompt, "response": response})

    def add_text(self, row: dict, split: str):
        self.text_sinks[split].add(row)

    def add_corpus(self, text: str, role: str, split: str | None = None):
        """The tokenizer's text: training rows only (``split`` None: a role that is not split, like DPO)."""
        if role not in self.corpus_roles or split not in (None, self.train_split):
            return
        if self.corpus_newline == "escape":
            text = text.replace("\\", "\\\\").replace("\n", "\\n")
        elif self.corpus_newline == "paragraphs":
            for line in text.split("\n"):
                if line.strip():
                    self.corpus.write(line.strip() + "\n")
                    self.corpus_lines += 1
            return
        else:
            text = re.sub(r"\s*\n\s*", " ", text)
        self.corpus.write(text + "\n")
        self.corpus_lines += 1

    def close(self) -> dict:
        counts = {}
        for k, s in self.split_sinks.items():
            s.close()
            counts[s.path.name] = s.rows
        for s in (*self.text_sinks.values(), self.dpo, self.ie):
            s.close()
            counts[s.path.name] = s.rows
        self.corpus.close()
        counts["my_corpus.txt"] = self.corpus_lines
        shutil.rmtree(self.tmp, ignore_errors=True)
        return counts


# ============================================================================================ the pipeline
@dataclass
class _Row:
    loc: str
    role: str
    fields: dict  # cleaned output fields
    title: str = ""
    raw: dict | None = None
    first_chunk: bool = True


class DataStage:
    """The data stage over one config: maps each source's records to rows, cleans them, drops duplicates
    (exact and near, across all sources) and writes the stage's outputs."""

    def __init__(self, cfg: dict, out_dir: Path):
        self.cfg = cfg
        self.out_dir = out_dir
        self.root = _resolve_root(cfg)
        dd = cfg["dedup"]
        self.exact_on, self.near_on = bool(dd.get("exact", True)), bool(dd.get("near", True))
        self.exact = {"text": ExactDeduper(), "dpo": ExactDeduper(), "ie": ExactDeduper()}
        self.near = DropDatasetDuplicate(threshold=float(dd["threshold"]), num_perm=int(dd["num_perm"]),
                                         ngram=int(dd["ngram"]), workers=int(dd.get("workers", 1)),
                                         seed=int(cfg["seed"]), store="disk", store_dir=str(out_dir),
                                         exact=False) \
            if self.near_on else None
        self.batch_size = int(dd.get("batch_size", 2048))
        self.n_examples = int(cfg.get("log_examples", 5))
        self.max_rows = cfg.get("max_rows_per_source")

    # ---------------------------------------------------------------- mapping + cleaning
    def _map(self, src: dict, rec: Rec, st: SourceStats, clean: CleanOptions) -> list[_Row] | None:
        role = src["role"]
        f = rec.fields
        ok, why = _passes(src.get("filters"), f)
        if not ok:
            st.rows_read += 1
            st.chars_in += sum(len(v) for v in f.values() if isinstance(v, str))
            st.drop("filter", rec.loc, why, sub=why, n_examples=self.n_examples)
            return None
        try:
            if role == "pretrain":
                outs = [{"text": render(src.get("text", "text"), f)}]
                title = render(src.get("title"), f) if src.get("title") else ""
            elif role == "sft":
                title = ""
                if src.get("conversations"):
                    conv = _get(f, src["conversations"])
                    if conv is _MISSING:
                        raise MissingField(src["conversations"])
                    try:
                        turns = normalize_turns(conv)
                    except ValueError as e:
                        raise MissingField(f"{src['conversations']}: {e}") from e
                    pairs = conversation_to_pairs(turns, src.get("multi_turn", "last"))
                    if not pairs:
                        raise MissingField(f"{src['conversations']}: no user->assistant turn")
                    outs = [{"prompt": p, "response": r} for p, r in pairs]
                else:
                    prompt = render(src.get("prompt", "prompt"), f)
                    if src.get("history"):
                        h = _get(f, src["history"])
                        hist = []
                        for item in (h if isinstance(h, list) else []):
                            if isinstance(item, (list, tuple)) and len(item) == 2:
                                hist += [("user", str(item[0])), ("assistant", str(item[1]))]
                        prompt = join_history(hist, prompt)
                    outs = [{"prompt": prompt, "response": render(src.get("response", "response"), f)}]
            elif role == "dpo":
                title = ""
                outs = [{k: render(src.get(k, k), f) for k in ("prompt", "chosen", "rejected")}]
            else:  # ie
                title = ""
                trip = _get(f, src.get("triples", "triples"))
                if trip is _MISSING:
                    raise MissingField(src.get("triples", "triples"))
                outs = [{"text": render(src.get("text", "text"), f), "triples": trip}]
        except MissingField as e:
            st.rows_read += 1
            st.chars_in += sum(len(v) for v in f.values() if isinstance(v, str))
            st.drop("bad_row", rec.loc, f"missing field {e.args[0]!r}", sub="missing_field",
                    n_examples=self.n_examples)
            return None
        rows: list[_Row] = []
        title_c = clean_text(title, clean) if title else ""
        for o in outs:
            in_chars = sum(len(v) for v in o.values() if isinstance(v, str))
            cleaned = {k: (clean_text(v, clean) if isinstance(v, str) else v) for k, v in o.items()}
            if role == "pretrain":
                chunks = _chunk(cleaned["text"], int(src["chunk_chars"])) if src.get("chunk_chars") else \
                    [cleaned["text"]]
                for ci, ch in enumerate(chunks):
                    rows.append(_Row(rec.loc, role, {"text": ch}, title_c, f, ci == 0))
                st.chars_in += in_chars
                st.rows_read += len(chunks)
            else:
                rows.append(_Row(rec.loc, role, cleaned, title_c, f))
                st.chars_in += in_chars
                st.rows_read += 1
        return rows

    def _check(self, src: dict, row: _Row, st: SourceStats) -> bool:
        """Empty / length / pattern checks; counts the drop and returns False when the row goes."""
        f = row.fields
        role = row.role
        if role in ("pretrain", "ie"):
            t = f["text"]
            if not t.strip():
                st.drop("bad_row", row.loc, "empty text", sub="empty", n_examples=self.n_examples)
                return False
            if len(t) < int(src["min_chars"]):
                st.drop("too_short", row.loc, n_examples=self.n_examples)
                return False
            if len(t) > int(src["max_chars"]) and role == "pretrain":
                st.drop("too_long", row.loc, f"{len(t)} chars", n_examples=self.n_examples)
                return False
        elif role == "sft":
            p, r = f["prompt"], f["response"]
            if not p.strip() or not r.strip():
                st.drop("bad_row", row.loc, "empty prompt" if not p.strip() else "empty response", sub="empty",
                        n_examples=self.n_examples)
                return False
            if len(p) < int(src["prompt_min_chars"]) or len(r) < int(src["response_min_chars"]):
                st.drop("too_short", row.loc, n_examples=self.n_examples)
                return False
            if len(p) > int(src["prompt_max_chars"]) or len(r) > int(src["response_max_chars"]):
                st.drop("too_long", row.loc, f"prompt {len(p)} / response {len(r)} chars", n_examples=self.n_examples)
                return False
        else:  # dpo
            if not all(f[k].strip() for k in ("prompt", "chosen", "rejected")):
                st.drop("bad_row", row.loc, "empty prompt/chosen/rejected", sub="empty", n_examples=self.n_examples)
                return False
            if f["chosen"] == f["rejected"]:
                st.drop("filter", row.loc, "chosen == rejected", sub="chosen == rejected", n_examples=self.n_examples)
                return False
            if len(f["prompt"]) > int(src["prompt_max_chars"]) or \
                    max(len(f["chosen"]), len(f["rejected"])) > int(src["response_max_chars"]):
                st.drop("too_long", row.loc, n_examples=self.n_examples)
                return False
            if len(f["chosen"]) < int(src["response_min_chars"]) or len(f["rejected"]) < 1:
                st.drop("too_short", row.loc, n_examples=self.n_examples)
                return False
        pats = src.get("reject_patterns") or []
        if pats:
            for k, v in f.items():
                if isinstance(v, str):
                    for pat in pats:
                        if re.search(pat, v):
                            st.drop("filter", row.loc, f"{k} matches {pat!r}", sub=f"reject_patterns: {pat}",
                                    n_examples=self.n_examples)
                            return False
        return True

    # ---------------------------------------------------------------- dedup + write
    def _drop_marked(self, rows: list, marks, reason: str, st: SourceStats) -> list:
        """The rows not marked; each marked one is counted as dropped for ``reason``."""
        kept = []
        for r, d in zip(rows, marks):
            if d:
                st.drop(reason, r.loc, n_examples=self.n_examples)
            else:
                kept.append(r)
        return kept

    def _flush(self, src: dict, batch: list[_Row], st: SourceStats, outs: Outputs):
        if not batch:
            return
        role = src["role"]
        if role in ("pretrain", "sft"):
            keys = [r.fields["text"] if role == "pretrain" else r.fields["prompt"] + "\x1f" + r.fields["response"]
                    for r in batch]
            table = self.exact["text"]
        elif role == "dpo":
            keys = ["\x1f".join((r.fields["prompt"], r.fields["chosen"], r.fields["rejected"])) for r in batch]
            table = self.exact["dpo"]
        else:
            keys = [r.fields["text"] for r in batch]
            table = self.exact["ie"]
        if self.exact_on and src.get("exact_dedup", True):
            dup = table.add_batch(keys)
        else:
            dup = np.zeros(len(batch), bool)
        survivors = self._drop_marked(batch, dup, "exact_dup", st)
        if survivors and self.near is not None and role in ("pretrain", "sft") and src.get("near_dedup", True):
            texts = [r.fields["text"] if role == "pretrain" else r.fields["prompt"] + "\n" + r.fields["response"]
                     for r in survivors]
            survivors = self._drop_marked(survivors, self.near.add_batch(texts), "near_dup", st)
        for r in survivors:
            self._write(src, r, st, outs)
        batch.clear()

    def _write(self, src: dict, r: _Row, st: SourceStats, outs: Outputs):
        st.kept += 1
        f = r.fields
        role = r.role
        st.chars_out += sum(len(v) for v in f.values() if isinstance(v, str))
        if role == "pretrain":
            split = outs.split_of()
            outs.add_text({"text": f["text"], "title": r.title, "source": src["name"]}, split)
            outs.add_corpus(f["text"], role, split)
            outs.samples.add({"source": src["name"], "loc": r.loc, "text": f["text"]})
            if self.cfg["prose_pairs"] and "pretrain" in self.cfg["splits_roles"]:
                pair = self._prose_pair(src, r, outs.pair_rng)
                if pair:
                    st.pairs_from_prose += 1
                    outs.add_pair(*pair, split)
        elif role == "sft":
            split = outs.split_of()
            if "sft" in self.cfg["splits_roles"]:
                outs.add_pair(f["prompt"], f["response"], split)
            outs.add_corpus(f["prompt"] + "\n" + f["response"], role, split)
            outs.samples.add({"source": src["name"], "loc": r.loc, "prompt": f["prompt"], "response": f["response"]})
        elif role == "dpo":
            outs.dpo.add(f)
            outs.add_corpus(f["prompt"] + "\n" + f["chosen"], role)
        else:
            outs.ie.add({"text": f["text"], "triples": json.dumps(f["triples"], ensure_ascii=False)})
            outs.add_corpus(f["text"], role)

    def _prose_pair(self, src: dict, r: _Row, rng: random.Random) -> tuple[str, str] | None:
        """Prompt/response from prose: ``title`` -> the text (first chunk; prompt from ``title_templates``), or
        ``split``: the first sentence(s) -> the rest."""
        mode = src.get("pairs", "auto")
        text = r.fields["text"]
        min_p, min_r = int(src["pair_min_prompt_chars"]), int(src["pair_min_response_chars"])
        if mode == "none":
            return None
        if mode in ("title", "auto") and r.title and r.first_chunk:
            tmpl = rng.choice(list(src.get("title_templates") or ["{title}"]))
            try:
                prompt = render(tmpl, {**(r.raw or {}), "title": r.title})
            except MissingField:
                prompt = r.title
            prompt = prompt.strip()
            if len(prompt) >= 2 and len(text) >= min_r and prompt != text:
                return prompt, text
            return None
        if mode == "title":
            return None
        sents = split_sentences(text)
        if len(sents) < 2:
            return None
        target = min(max(len(text) * 0.3, 10), 200)
        p = ""
        i = 0
        while i < len(sents) - 1 and (len(p) < target or not p.strip()):
            p += sents[i]
            i += 1
        prompt, response = p.strip(), "".join(sents[i:]).strip()
        if len(prompt) < min_p or len(response) < min_r:
            return None
        return prompt, response

    # ---------------------------------------------------------------- one source
    def run_source(self, src: dict, outs: Outputs, progress=None) -> SourceStats:
        st = SourceStats(src["name"], src["role"])
        t0 = time.time()
        files = _resolve_files(src, self.root)
        st.files = len(files)
        optional = bool(src.get("optional"))
        if not files:
            msg = f"source {src['name']}: no file matches {src['path']!r} under {self.root}"
            if optional:
                st.error = msg
                log.warning(msg + " (optional source skipped)")
                return st
            raise SourceFileError(msg)
        reader = get_reader(src["reader"])
        opts = dict(src.get("options") or {})
        opts.setdefault("encoding", src.get("encoding", "utf-8"))
        opts.setdefault("max_row_bytes", int(src.get("max_row_bytes", 1 << 20)))
        clean = CleanOptions.from_dict(src.get("clean"))
        limit = src.get("max_rows") or self.max_rows
        limit = int(limit) if limit else None
        batch: list[_Row] = []
        task = progress.add_task(f"{src['name']}", total=len(files)) if progress is not None else None
        done = False
        for path in files:
            if done:
                break
            try:
                for item in reader(path, **opts):
                    if limit is not None and st.rows_read >= limit:
                        done = True
                        break
                    st.records_read += 1
                    if isinstance(item, Bad):
                        st.rows_read += 1
                        st.chars_in += len(item.text) if item.text else int(item.chars or 0)
                        st.drop(item.category, item.loc, item.detail, sub=item.reason, n_examples=self.n_examples)
                        continue
                    rows = self._map(src, item, st, clean)
                    if not rows:
                        continue
                    for row in rows:
                        if self._check(src, row, st):
                            batch.append(row)
                    if len(batch) >= self.batch_size:
                        self._flush(src, batch, st, outs)
                        if progress is not None:
                            progress.update(task, description=f"{src['name']} rows={st.rows_read:,}")
            except SourceFileError as e:
                self._flush(src, batch, st, outs)
                if optional:
                    st.error = str(e)
                    log.warning("%s: %s (optional source, file skipped)", src["name"], e)
                    continue
                raise
            except (OSError, UnicodeError) as e:
                self._flush(src, batch, st, outs)
                err = SourceFileError(f"source {src['name']}: cannot read {path}: {type(e).__name__}: {e}")
                if optional:
                    st.error = str(err)
                    log.warning("%s (optional source, file skipped)", err)
                    continue
                raise err from e
            if progress is not None:
                progress.update(task, advance=1, description=f"{src['name']} rows={st.rows_read:,}")
        self._flush(src, batch, st, outs)
        st.seconds = time.time() - t0
        if progress is not None:
            progress.update(task, completed=len(files), description=f"{src['name']} rows={st.rows_read:,}")
        log.info("%s: read %d rows, kept %d, dropped %s (%.1fs)", src["name"], st.rows_read, st.kept,
                 dict(st.dropped), st.seconds)
        return st

    def close(self):
        if self.near is not None:
            self.near.close()


def _chunk(text: str, size: int) -> list[str]:
    """Split a long document into pieces of at most ``size`` characters at paragraph, then sentence, then
    comma/space boundaries (a hard cut only inside an unbroken run longer than ``size``).  Nothing is lost."""
    if len(text) <= size:
        return [text]
    pieces: list[tuple[str, bool]] = []  # (piece, starts a paragraph)
    for para in text.split("\n"):
        if not para.strip():
            continue
        if len(para) <= size:
            pieces.append((para, True))
            continue
        first = True
        for sent in split_sentences(para):
            while len(sent) > size:
                cut = max(sent.rfind(c, 0, size) for c in "，,；; 、")
                cut = cut + 1 if cut > size // 3 else size
                pieces.append((sent[:cut], first))
                first = False
                sent = sent[cut:]
            if sent:
                pieces.append((sent, first))
                first = False
    chunks, cur = [], ""
    for piece, new_para in pieces:
        joiner = "" if not cur else ("\n" if new_para else "")
        if cur and len(cur) + len(joiner) + len(piece) > size:
            chunks.append(cur.strip())
            cur = piece
        else:
            cur += joiner + piece
    if cur.strip():
        chunks.append(cur.strip())
    return chunks


# ============================================================================================ entry points
def _peak_rss_mb() -> dict:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"self": round(self_kb / 1024, 1), "children_max": round(child_kb / 1024, 1)}


def _setup_logging(out_dir: Path, verbose: bool) -> logging.Handler:
    log.setLevel(logging.INFO)
    fh = logging.FileHandler(out_dir / "raw_data_process.log", mode="w", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(fh)
    return fh


def run_pipeline(config_path, output_dir: str | os.PathLike | None = None, **overrides) -> dict:
    """Run the data stage; returns the report (also written to ``output_dir/report.json``).

    ``overrides``: any top-level config key (``data_root``, ``seed``, ``splits``, ``max_rows_per_source``,
    ``only_sources``, ``progress``...) or a dotted one (``dedup.workers``)."""
    t0 = time.time()
    cfg = load_config(config_path, overrides)
    if output_dir is None:
        output_dir = cfg.get("output_dir") or f"data/generated/{Path(str(config_path)).stem}"
    out = Path(output_dir)
    if not out.is_absolute():
        out = (Path.cwd() / out)
    out.mkdir(parents=True, exist_ok=True)
    handler = _setup_logging(out, False)
    log.info("config %s -> %s (data_root %s)", cfg["_config_path"], out, _resolve_root(cfg))
    pipe = DataStage(cfg, out)
    outs = Outputs(out, cfg)
    stats: dict[str, SourceStats] = {}
    progress = None
    try:
        if cfg.get("progress", True):
            progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("files"), TimeElapsedColumn())
            progress.start()
        for src in cfg["sources"]:
            stats[src["name"]] = pipe.run_source(src, outs, progress)
    finally:
        if progress is not None:
            progress.stop()
        counts = outs.close()
        near = pipe.near
        dedup_info = {
            "threshold": cfg["dedup"]["threshold"], "num_perm": cfg["dedup"]["num_perm"],
            "ngram": cfg["dedup"]["ngram"],
            "bands": near.bands if near else None, "rows": near.rows if near else None,
            "candidates_verified": near.n_candidates if near else 0,
            "near_index_bytes": near.index_nbytes if near else 0,
            "near_index_docs": near.n_docs if near else 0,
            "exact_index_bytes": sum(e.nbytes for e in pipe.exact.values()),
        }
        if near and near.n_docs:
            dedup_info["index_bytes_per_doc"] = round((near.index_nbytes + pipe.exact["text"].nbytes) / near.n_docs, 1)
        pipe.close()
        log.removeHandler(handler)
        handler.close()
    per = {k: v.as_dict() for k, v in stats.items()}
    totals = {"rows_read": 0, "records_read": 0, "kept": 0, "chars_in": 0, "chars_out": 0, "pairs_from_prose": 0,
              "dropped": {r: 0 for r in DROP_REASONS}, "bad_row_detail": Counter()}
    by_role: dict[str, dict] = {}
    for s in per.values():
        for k in ("rows_read", "records_read", "kept", "chars_in", "chars_out", "pairs_from_prose"):
            totals[k] += s[k]
        for r in DROP_REASONS:
            totals["dropped"][r] += s["dropped"][r]
        totals["bad_row_detail"].update(s["bad_row_detail"])
        br = by_role.setdefault(s["role"], {"rows_read": 0, "kept": 0, "dropped_total": 0})
        br["rows_read"] += s["rows_read"]
        br["kept"] += s["kept"]
        br["dropped_total"] += s["dropped_total"]
    totals["bad_row_detail"] = dict(totals["bad_row_detail"])
    totals["dropped_total"] = sum(totals["dropped"].values())
    totals["adds_up"] = totals["rows_read"] == totals["kept"] + totals["dropped_total"]
    report = {
        "config": cfg["_config_path"], "data_root": str(_resolve_root(cfg)), "output_dir": str(out),
        "seed": cfg["seed"], "splits": cfg["splits"], "wall_seconds": round(time.time() - t0, 2),
        "peak_rss_mb": _peak_rss_mb(), "totals": totals, "by_role": by_role, "outputs": counts,
        "dedup": dedup_info, "sources": per,
        "notes": "rows_read counts rows after long prose is cut into chunks (chunk_chars) and conversations into "
                 "turns (multi_turn=per_turn); records_read counts what the readers returned. "
                 "rows_read == kept + sum(dropped) for every source.",
    }
    with open(out / "report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, ensure_ascii=False, indent=2)
    with open(out / "samples.json", "w", encoding="utf-8") as f:
        json.dump(outs.samples.items, f, ensure_ascii=False, indent=2)
    return report


def _print_summary(report: dict):
    console = Console(width=max(Console().width, 150))
    t = Table(title=f"data stage: {report['output_dir']}")
    heads = ["source", "read", "kept", "bad", "short", "long", "filter", "exact", "near", "chars in", "chars out"]
    for c in heads:
        t.add_column(c, justify="right" if c != "source" else "left", no_wrap=True)
    for name, s in report["sources"].items():
        t.add_row(name, f"{s['rows_read']:,}", f"{s['kept']:,}", *[f"{s['dropped'][r]:,}" for r in DROP_REASONS],
                  f"{s['chars_in']:,}", f"{s['chars_out']:,}")
    tt = report["totals"]
    t.add_row("TOTAL", f"{tt['rows_read']:,}", f"{tt['kept']:,}", *[f"{tt['dropped'][r]:,}" for r in DROP_REASONS],
              f"{tt['chars_in']:,}", f"{tt['chars_out']:,}")
    console.print(t)
    console.print(f"outputs: {report['outputs']}\nwall {report['wall_seconds']} s, peak RSS {report['peak_rss_mb']} MB, "
                  f"report: {report['output_dir']}/report.json")


def main(config: str = "data/sources/shared_all.yaml", output_dir: str | None = None, quiet: bool = False,
         **overrides):
    """CLI: ``--config`` YAML/JSON, ``--output_dir`` (default ``data/generated/<config name>``), any override
    (``--max_rows_per_source 200``, ``--data_root /path``, ``--only_sources '[a,b]'``, ``--dedup.workers 2``)."""
    if quiet:
        overrides["progress"] = False
    report = run_pipeline(config, output_dir, **overrides)
    _print_summary(report)
    if not report["totals"]["adds_up"]:
        raise SystemExit("report does not add up: rows_read != kept + dropped")
    return None


if __name__ == "__main__":
    import sys

    if {"--help", "-h"} & set(sys.argv[1:]):
        print(data_stage_help())
        raise SystemExit(0)
    run_cli(main)
