"""Training data in any common shape: files, globs, folders and ``datasets`` sources, read as rows of one kind.

A *spec* is a comma-separated list of entries, each optionally followed by ``:weight`` (a per-epoch repeat
factor). An entry is

* a file: ``.parquet``, ``.txt`` (one document a line), ``.jsonl``, ``.json`` (an array or JSON lines),
  ``.csv``;
* a glob (``data/sft/*.jsonl``) or a folder (every such file under it, sorted);
* a ``datasets`` source: ``hf:NAME[:SPLIT][?key=value&...]``, i.e. ``load_dataset(NAME, split=SPLIT, **kw)``,
  e.g. ``hf:org/name:train``, ``hf:org/name:train?name=zh&streaming=true`` or
  ``hf:json:train?data_files=a.jsonl``. ``streaming=true`` streams it (nothing downloaded ahead; a resume
  skips to its row), otherwise ``datasets`` keeps it as memory-mapped Arrow on disk.

Whatever the format, the columns are mapped to one of two kinds of rows (``schema``, detected from the names):

=============  ==================================================  =====================================
schema         columns                                             row
=============  ==================================================  =====================================
``pairs``      ``prompt``, ``response``                            (prompt, response)
``completion`` ``prompt``, ``completion`` (TRL)                    (prompt, completion)
``alpaca``     ``instruction``, ``input`` (optional), ``output``   (instruction + "\\n" + input, output)
``messages``   ``messages`` or ``conversations`` (OpenAI/ShareGPT)  (the turns before the last assistant
                                                                   turn through the chat template, that
                                                                   turn)
``text``       ``text``                                            (text,): prose for pretraining
=============  ==================================================  =====================================

``?prompt=question&response=answer`` (or ``text=body``, ``messages=dialog``) in a spec names other columns.
A row that does not fit its schema (a missing or non-string field, a conversation without an assistant turn,
a line that is not JSON) is *bad*: it is kept as an empty row so row numbers (and exact resume) stay stable,
skipped by the dataset like an empty row, and counted in ``SourceInfo.problems`` with file, row, field and
what was expected.
"""
from __future__ import annotations

import glob as globlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import parse_qsl

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.prompt import render_messages

HF_PREFIX = "hf:"
FILE_TYPES = (".parquet", ".txt", ".jsonl", ".json", ".csv")
SCHEMAS = ("pairs", "completion", "alpaca", "messages", "text")
# The one role set of every conversation format read here: ShareGPT (from/value), OpenAI (role/content), OASST.
USER_ROLES = {"user", "human", "prompter", "question"}
ASSISTANT_ROLES = {"assistant", "gpt", "bot", "model", "chatgpt", "answer"}
TOOL_ROLES = {"observation", "function", "tool"}  # tool output is input to the model: read as a user turn
MAX_EXAMPLES = 5


@dataclass
class RowProblems:
    """Bad rows of one source: their count, by field, and the first few as ``file:row field: expected``."""

    count: int = 0
    by_field: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False)

    def add(self, path: str, row: int, fld: str, expected: str) -> None:
        if row in self._seen:  # read again (next epoch, a streaming re-read): counted once
            return
        self._seen.add(row)
        self.count += 1
        self.by_field[fld] = self.by_field.get(fld, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{path}:{row} {fld}: {expected}")

    def summary(self) -> dict:
        return {"bad_rows": self.count, "by_field": dict(self.by_field), "examples": list(self.examples)}


@dataclass
class SourceInfo:
    """One input: its kind (``pairs`` or ``text``), format, schema and row count."""

    path: str
    weight: float
    kind: str  # pairs | text
    fmt: str  # parquet | txt | jsonl | arrow (a datasets Dataset) | stream (a datasets IterableDataset)
    num_rows: int
    columns: tuple = ()  # the columns read (parquet) / the fields mapped
    row_group_starts: tuple = ()
    schema: str = ""  # one of SCHEMAS
    mapping: dict = field(default_factory=dict)  # role in the schema -> column name
    spec: str = ""  # the datasets source (fmt arrow | stream): hf:NAME[:SPLIT][?...]
    problems: RowProblems = field(default_factory=RowProblems, repr=False, compare=False)


# ------------------------------------------------------------------------------------------ specs
def parse_file_spec(spec) -> list[tuple[str, float]]:
    """``"a.parquet:2,b.txt"`` (or a list) -> [(path, weight)]; a weight is a per-epoch repeat factor."""
    if spec is None or spec == "":
        return []
    items = [str(x) for x in spec] if isinstance(spec, (list, tuple)) else str(spec).split(",")
    out = []
    for it in (x.strip() for x in items):
        if not it:
            continue
        path, weight = it, 1.0
        if ":" in it:
            head, tail = it.rsplit(":", 1)
            try:
                weight, path = float(tail), head
            except ValueError:
                pass
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"{path}: weight must be a finite number >= 0, got {weight}")
        out.append((path, weight))
    return out


def expand_path(path: str) -> list[str]:
    """A file, a glob or a folder -> the data files it names (a ``hf:`` spec stays as it is)."""
    if path.startswith(HF_PREFIX):
        return [path]
    p = Path(path)
    if p.is_dir():
        found = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in FILE_TYPES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not found:
            raise FileNotFoundError(f"{p}: folder holds no data file ({', '.join(FILE_TYPES)})")
        return found
    if any(c in path for c in "*?["):
        found = sorted(f for f in globlib.glob(path, recursive=True) if Path(f).is_file())
        if not found:
            raise FileNotFoundError(f"{path}: no file matches this pattern")
        return found
    return [path]


def parse_hf_spec(spec: str) -> tuple[str, str, dict]:
    """``hf:NAME[:SPLIT][?k=v&...]`` -> (name, split, load_dataset keyword arguments)."""
    body = spec[len(HF_PREFIX):]
    body, _, query = body.partition("?")
    name, _, split = body.partition(":")
    if not name:
        raise ValueError(f"{spec}: expected hf:NAME[:SPLIT][?key=value&...]")
    kw: dict = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        if v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if k == "data_files" and isinstance(v, str) and any(c in v for c in "*?["):
            v = sorted(globlib.glob(v, recursive=True)) or v
        kw[k] = v
    return name, split or "train", kw


_LOADED: dict = {}


def load_hf(spec: str):
    """The ``datasets`` object of a spec (a Dataset, or an IterableDataset with ``streaming=true``), loaded once
    per process."""
    if spec not in _LOADED:
        import datasets  # loaded only for such sources

        name, split, kw = parse_hf_spec(spec)
        kw = {k: v for k, v in kw.items() if k not in _MAPPING_KEYS}
        try:
            _LOADED[spec] = datasets.load_dataset(name, split=split, **kw)
        except Exception as e:  # datasets raises many types (missing file, no network, bad config)
            raise ValueError(f"{spec}: load_dataset({name!r}, split={split!r}"
                             f"{''.join(f', {k}={v!r}' for k, v in kw.items())}) failed: {e}") from e
    return _LOADED[spec]


_MAPPING_KEYS = ("prompt", "response", "completion", "text", "messages", "instruction", "input", "output")


# ------------------------------------------------------------------------------------------ schemas
def detect_schema(names, path: str, mapping: Optional[dict] = None) -> tuple[str, dict]:
    """Column names -> (schema, {role: column}); a clear error naming what was found otherwise."""
    names = list(names)
    m = dict(mapping or {})
    has = lambda role: m.get(role, role) in names  # noqa: E731
    col = lambda role: m.get(role, role)  # noqa: E731
    if "messages" in m or "messages" in names or "conversations" in names:
        c = m.get("messages") or ("messages" if "messages" in names else "conversations")
        if c in names:
            return "messages", {"messages": c}
    if has("prompt") and has("response"):
        return "pairs", {"prompt": col("prompt"), "response": col("response")}
    if has("prompt") and has("completion"):
        return "completion", {"prompt": col("prompt"), "response": col("completion")}
    if has("instruction") and has("output"):
        return "alpaca", {"instruction": col("instruction"), "input": col("input"), "output": col("output")}
    if has("prompt"):
        raise ValueError(f"{path}: missing column 'response' (text-to-text files need columns 'prompt' and "
                         f"'response' or 'completion', plain-text files a 'text' column); found columns: "
                         f"{', '.join(names) or 'none'}")
    if has("text"):
        return "text", {"text": col("text")}
    raise ValueError(f"{path}: no known columns: expected prompt/response, prompt/completion, "
                     f"instruction/input/output, messages or conversations, or text; found columns: "
                     f"{', '.join(names) or 'none'} (name others with ?prompt=COL&response=COL)")


def normalize_turns(conv) -> list[tuple[str, str]]:
    """``[{role|from, content|value}]`` -> ``[("user"|"assistant"|"system"|other, text)]``: the one reading of a
    conversation, for the training sources and the data stage alike. A turn without a role is a user turn."""
    if not isinstance(conv, (list, tuple)):
        raise ValueError("a list of turns")
    out = []
    for t in conv:
        if not isinstance(t, dict):
            raise ValueError("turns as objects with role/content (or from/value)")
        role = str(t.get("role", t.get("from", "")) or "").lower()
        text = t.get("content", t.get("value"))
        if not isinstance(text, (str, int, float)):
            raise ValueError("a string content/value in every turn")
        if role in USER_ROLES or role in TOOL_ROLES:
            role = "user"
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        out.append((role or "user", str(text)))
    return out


def messages_to_pair(conv) -> tuple[str, str]:
    """A conversation -> (prompt: the turns before the last assistant turn through the chat template's layout,
    response: the last assistant turn). System turns are joined into one system message first."""
    turns = normalize_turns(conv)
    last = max((i for i, (r, _) in enumerate(turns) if r == "assistant"), default=-1)
    if last < 0 or not turns[last][1].strip():
        raise ValueError("an assistant turn with text (the response)")
    system = "\n".join(t for r, t in turns[:last] if r == "system")
    before = [(r, t) for r, t in turns[:last] if r != "system"]
    if not before or before[-1][0] != "user":
        raise ValueError("a user turn right before the last assistant turn")
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": r, "content": t} for r, t in before]
    return render_messages(msgs), turns[last][1]


def map_record(schema: str, mapping: dict, rec: dict) -> tuple:
    """One record -> a row of the schema's kind; raises ``BadRow`` naming the field and what was expected."""
    def text(role, optional=False):
        c = mapping[role]
        v = rec.get(c)
        if v is None and optional:
            return ""
        if not isinstance(v, str):
            raise BadRow(c, f"a string, got {type(v).__name__}")
        return v
    if schema == "text":
        return (text("text"),)
    if schema in ("pairs", "completion"):
        return text("prompt"), text("response")
    if schema == "alpaca":
        extra = text("input", optional=True)
        return text("instruction") + ("\n" + extra if extra else ""), text("output")
    try:
        return messages_to_pair(rec.get(mapping["messages"]))
    except ValueError as e:
        raise BadRow(mapping["messages"], str(e)) from None


class BadRow(ValueError):
    def __init__(self, fld: str, expected: str):
        super().__init__(f"{fld}: {expected}")
        self.field, self.expected = fld, expected


# ------------------------------------------------------------------------------------------ inspection
def inspect_source(path: str, weight: float = 1.0) -> SourceInfo:
    """Validate one input before training: clear errors for a missing file/column, an empty file, null values."""
    if path.startswith(HF_PREFIX):
        return _inspect_hf(path, weight)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: data file not found")
    if p.suffix == ".txt":
        with open(p, "rb") as f:
            n = sum(1 for line in f if line.strip())
        if n == 0:
            raise ValueError(f"{p}: empty file (no non-empty lines)")
        return SourceInfo(str(p), weight, "text", "txt", n, ("text",), schema="text", mapping={"text": "text"})
    if p.suffix == ".jsonl" or (p.suffix == ".json" and _first_char(p) not in "["):
        return _inspect_jsonl(p, weight)
    if p.suffix in (".json", ".csv"):
        kind = "json" if p.suffix == ".json" else "csv"
        return _inspect_hf(f"{HF_PREFIX}{kind}:train?data_files={p}", weight, shown=str(p))
    if p.suffix != ".parquet":
        raise ValueError(f"{p}: unsupported data file type {p.suffix!r}; expected one of {', '.join(FILE_TYPES)}, "
                         f"a glob, a folder or a datasets source (hf:NAME[:SPLIT])")
    return _inspect_parquet(p, weight)


def _first_char(p: Path) -> str:
    with open(p, "rb") as f:
        while True:
            b = f.read(1)
            if not b or not b.isspace():
                return b.decode("latin-1")


def _kind(schema: str) -> str:
    return "text" if schema == "text" else "pairs"


def _inspect_parquet(p: Path, weight: float) -> SourceInfo:
    try:
        pf = pq.ParquetFile(p)
    except Exception as e:  # pyarrow raises several types for broken files
        raise ValueError(f"{p}: not a readable parquet file ({e})") from e
    names = list(pf.schema_arrow.names)
    schema, mapping = detect_schema(names, str(p))
    cols = tuple(c for c in dict.fromkeys(mapping.values()) if c in names)
    strict = schema in ("pairs", "text")  # the project's own files: nulls and wrong types are errors
    if strict:
        for c in cols:
            t = pf.schema_arrow.field(c).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"):
                raise ValueError(f"{p}: column {c!r} must hold strings, found type {t}")
    md = pf.metadata
    if md.num_rows == 0:
        raise ValueError(f"{p}: empty file (0 rows); column(s) {', '.join(cols)} have no data")
    starts, acc = [], 0
    for g in range(md.num_row_groups):
        starts.append(acc)
        acc += md.row_group(g).num_rows
    for c in cols if strict else ():
        j = names.index(c)
        for g in range(md.num_row_groups):
            stats = md.row_group(g).column(j).statistics
            nulls = stats.null_count if (stats is not None and stats.has_null_count) else None
            if nulls is None or nulls > 0:
                col = pf.read_row_group(g, columns=[c]).column(c)
                if col.null_count:
                    first = int(pc.index(pc.is_null(col), True).as_py())
                    raise ValueError(f"{p}: column {c!r} has {col.null_count} null value(s) in row group {g}, "
                                     f"first at row {starts[g] + first}; drop or fill them before training")
    return SourceInfo(str(p), weight, _kind(schema), "parquet", md.num_rows, cols, tuple(starts), schema, mapping)


def _inspect_jsonl(p: Path, weight: float) -> SourceInfo:
    n, names = 0, None
    with open(p, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            n += 1
            if names is None:
                try:
                    rec = json.loads(line)
                    names = list(rec) if isinstance(rec, dict) else None
                except ValueError:
                    pass
    if n == 0:
        raise ValueError(f"{p}: empty file (no non-empty lines)")
    if names is None:
        raise ValueError(f"{p}: no line is a JSON object")
    schema, mapping = detect_schema(names, str(p))
    return SourceInfo(str(p), weight, _kind(schema), "jsonl", n, tuple(mapping.values()), schema=schema,
                      mapping=mapping)


def _inspect_hf(spec: str, weight: float, shown: Optional[str] = None) -> SourceInfo:
    ds = load_hf(spec)
    _, split, kw = parse_hf_spec(spec)
    mapping_opts = {k: v for k, v in kw.items() if k in _MAPPING_KEYS}
    shown = shown or spec
    streaming = not hasattr(ds, "__len__")
    names = list(ds.column_names or []) if getattr(ds, "column_names", None) else None
    if streaming:
        n = None
        splits = getattr(getattr(ds, "info", None), "splits", None) or {}
        if split in splits and splits[split].num_examples:
            n = int(splits[split].num_examples)
        if names is None or n is None:  # unknown ahead: one pass (names from the first row)
            count = 0
            for rec in ds:
                if names is None:
                    names = list(rec)
                count += 1
            n = n or count
    else:
        n = len(ds)
    if not n:
        raise ValueError(f"{shown}: empty dataset (0 rows)")
    schema, mapping = detect_schema(names or [], shown, mapping_opts)
    return SourceInfo(spec if shown == spec else shown, weight, _kind(schema), "stream" if streaming else "arrow",
                      n, tuple(mapping.values()), schema=schema, mapping=mapping, spec=spec)


def open_sources(spec) -> list[SourceInfo]:
    """Every entry of a spec, globs and folders expanded (each file keeps the entry's weight), inspected."""
    sources = [inspect_source(f, w) for p, w in parse_file_spec(spec) for f in expand_path(p)]
    if not sources:
        raise ValueError(f"no training file given (got {spec!r})")
    if all(s.weight == 0 for s in sources):
        raise ValueError(f"every training file has weight 0: {spec!r}")
    return sources


def source_signature(src: SourceInfo) -> list:
    """What identifies a source's content for caches: path, size and time for files, the spec otherwise."""
    if Path(src.path).is_file():
        return [src.path, os.path.getsize(src.path), os.path.getmtime(src.path)]
    return [src.path, src.num_rows]


def bad_row_report(sources) -> list[str]:
    """One line per source with bad rows: count, by field, the first examples."""
    out = []
    for s in sources:
        pr = s.problems
        if pr.count:
            fields = ", ".join(f"{k}: {v}" for k, v in pr.by_field.items())
            out.append(f"{s.path}: {pr.count} bad row(s) skipped ({fields}); e.g. " + "; ".join(pr.examples))
    return out


# ------------------------------------------------------------------------------------------ reading
def _mapped(src: SourceInfo, first: int, recs: list) -> list[tuple]:
    """Records -> rows of the source's kind; a bad record becomes an empty row (skipped, counted)."""
    empty = ("",) if src.kind == "text" else ("", "")
    rows = []
    for i, rec in enumerate(recs):
        if isinstance(rec, BadRow):
            src.problems.add(src.path, first + i, rec.field, rec.expected)
            rows.append(empty)
            continue
        try:
            rows.append(map_record(src.schema, src.mapping, rec))
        except BadRow as e:
            src.problems.add(src.path, first + i, e.field, e.expected)
            rows.append(empty)
    return rows


def _lines(src: SourceInfo, start_row: int, chunk: int, start_offset: int, parse):
    """Non-empty lines of a text file as (first_row, values, byte_offsets_after_each_row)."""
    with open(src.path, "rb") as f:
        f.seek(start_offset)
        row, vals, offs, first = start_row, [], [], start_row
        if start_offset == 0 and start_row > 0:  # no offset saved: skip rows by reading
            skipped = 0
            while skipped < start_row:
                line = f.readline()
                if not line:
                    return
                if line.strip():
                    skipped += 1
        while True:
            line = f.readline()
            if not line:
                break
            if not line.strip():
                continue
            vals.append(parse(line))
            offs.append(f.tell())
            row += 1
            if len(vals) >= chunk:
                yield first, vals, offs
                first, vals, offs = row, [], []
        if vals:
            yield first, vals, offs


def _json_line(line: bytes):
    try:
        rec = json.loads(line)
    except ValueError as e:
        return BadRow("(line)", f"a JSON object ({e.msg})")
    return rec if isinstance(rec, dict) else BadRow("(line)", f"a JSON object, got {type(rec).__name__}")


def iter_source_rows(src: SourceInfo, start_row: int = 0, chunk: int = 1024,
                     start_offset: int = 0) -> Iterator[tuple[int, list[tuple], list[int]]]:
    """Yield ``(first_row, rows, byte_offsets_after_each_row)`` from ``start_row`` on, ``chunk`` rows at a time.

    Byte offsets are only meaningful for .txt and .jsonl (they make a streaming resume seek instead of
    re-reading); Arrow datasets are read by row index, streamed ``datasets`` sources skip to ``start_row``.
    """
    if src.fmt == "txt":
        for first, vals, offs in _lines(src, start_row, chunk, start_offset,
                                        lambda b: (b.decode("utf-8", errors="replace").strip(),)):
            yield first, vals, offs
        return
    if src.fmt == "jsonl":
        for first, recs, offs in _lines(src, start_row, chunk, start_offset, _json_line):
            yield first, _mapped(src, first, recs), offs
        return
    if src.fmt == "arrow":
        ds = load_hf(src.spec)
        for first in range(start_row, len(ds), chunk):
            part = ds[first: first + chunk]  # a dict of columns
            n = len(next(iter(part.values()))) if part else 0
            recs = [{k: v[i] for k, v in part.items()} for i in range(n)]
            yield first, _mapped(src, first, recs), []
        return
    if src.fmt == "stream":
        ds = load_hf(src.spec)
        it = iter(ds.skip(start_row) if start_row else ds)
        first, recs = start_row, []
        for rec in it:
            recs.append(rec)
            if len(recs) >= chunk:
                yield first, _mapped(src, first, recs), []
                first, recs = first + len(recs), []
        if recs:
            yield first, _mapped(src, first, recs), []
        return
    pf = pq.ParquetFile(src.path)
    starts = list(src.row_group_starts) or [0]
    g = max(i for i, s in enumerate(starts) if s <= start_row) if start_row > 0 else 0
    skip = start_row - starts[g]
    row = start_row
    groups = list(range(g, pf.metadata.num_row_groups))
    if not groups:
        return
    direct = src.schema in ("pairs", "text")
    for rb in pf.iter_batches(batch_size=chunk, row_groups=groups, columns=list(src.columns)):
        cols = [rb.column(c).to_pylist() for c in src.columns]
        rows = list(zip(*cols))
        if skip:
            take = min(skip, len(rows))
            rows, skip = rows[take:], skip - take
        if rows:
            if not direct:
                rows = _mapped(src, row, [dict(zip(src.columns, r)) for r in rows])
            yield row, rows, []
            row += len(rows)


# ------------------------------------------------------------------------------------ raw records
def iter_records(spec: str) -> Iterator[tuple[str, Optional[dict], Optional[str]]]:
    """``(where, record, error)`` for every row of a spec's sources, unmapped, for builders with their own
    schemas (preference pairs, triples): ``where`` is ``file:row``, ``error`` says why a row is not a record."""
    for path, _ in parse_file_spec(spec):
        for one in expand_path(path):
            p = Path(one)
            if one.startswith(HF_PREFIX):
                ds, shown = load_hf(one), one
            elif not p.is_file():
                raise FileNotFoundError(f"{p}: data file not found")
            elif p.suffix == ".parquet":
                pf = pq.ParquetFile(p)
                i = 0
                for rb in pf.iter_batches(batch_size=1024):
                    for rec in rb.to_pylist():
                        yield f"{p}:{i}", rec, None
                        i += 1
                continue
            elif p.suffix == ".jsonl" or (p.suffix == ".json" and _first_char(p) not in "["):
                with open(p, "rb") as f:
                    for i, line in enumerate(f, 1):
                        if line.strip():
                            rec = _json_line(line)
                            yield (f"{p}:{i}", None, f"{rec.field}: {rec.expected}") if isinstance(rec, BadRow) \
                                else (f"{p}:{i}", rec, None)
                continue
            elif p.suffix in (".json", ".csv"):
                ds, shown = load_hf(f"{HF_PREFIX}{p.suffix[1:]}:train?data_files={p}"), str(p)
            else:
                raise ValueError(f"{p}: unsupported record file type {p.suffix!r}; expected .jsonl, .json, .csv, "
                                 f".parquet or a datasets source (hf:NAME[:SPLIT])")
            for i, rec in enumerate(ds):
                yield f"{shown}:{i}", rec, None
