"""Streaming readers for the raw corpora's formats.

Every reader is a generator ``reader(path, **options)`` that yields, in file order, either a :class:`Rec`
(``loc`` = ``"file:line"``, ``fields`` = a dict of raw fields) or a :class:`Bad` (a row that could not be read:
``reason`` is one of :data:`BAD_REASONS`, ``loc`` names the file and line).  Readers never hold a whole file in
memory except :func:`read_json` for a top-level JSON *object* (bounded by ``max_file_bytes``): JSON arrays are
decoded one element at a time, lines are read with a length limit (``max_row_bytes``; longer rows are skipped
and reported as ``too_large``).

A file that cannot be read at all (missing, not a parquet file, permission denied) raises
:class:`SourceFileError` naming it; the pipeline decides whether the source is optional.

Formats: plain lines (optionally ``label<TAB>text`` columns), word/POS tagged lines, blank-line separated
blocks, fortune files, JSON lines, JSON arrays/objects (with a record path or a recursive walk for nested
collections such as chinese-poetry), SQuAD JSON, CSV in any encoding (GB18030 included), parquet, gzip'd troff
man pages, HTML, wikiextractor output, information-extraction (``spo_list``) files and preference-pair files
(:func:`iter_dpo_records`).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, Callable, Iterator

import ujson

from model.data.sources import normalize_turns
from model.prompt import join_history
from utils.text_cleaning import strip_ansi, troff_to_text

__all__ = [
    "Rec", "Bad", "SourceFileError", "BAD_REASONS", "READERS", "get_reader", "iter_dpo_records",
    "conversation_to_pairs", "read_lines", "read_tagged", "read_blocks",
    "read_fortune", "read_jsonl", "read_json", "read_json_walk", "read_squad", "read_csv", "read_parquet",
    "read_manpage", "read_html", "read_wikiextractor", "read_ie", "read_dpo", "sniff_encoding",
]

DEFAULT_MAX_ROW_BYTES = 1 << 20  # 1 MiB
DEFAULT_MAX_FILE_BYTES = 256 << 20

BAD_REASONS = (
    "decode_error",  # bytes that do not decode in the declared encoding (and not in the usual other one)
    "wrong_encoding",  # the file is in another encoding than the one declared (e.g. GB18030 read as UTF-8)
    "invalid_json",  # a JSON line / array element that does not parse, or is not an object
    "missing_field",  # a field named by the mapping is absent, or a CSV/TSV row has too few columns
    "empty",  # the mapped text is empty
    "too_large",  # a raw row above max_row_bytes, skipped without being held in memory
    "truncated_gzip",  # a gzip stream that ends early
    "corrupt_gzip",  # a gzip stream with bad data
    "bad_csv",  # a CSV row the csv module rejects
    "not_gzip",  # a .gz file that is not gzip data
)


class SourceFileError(RuntimeError):
    """A whole file could not be read; the message names the file."""


@dataclass(slots=True)
class Rec:
    loc: str
    fields: dict


@dataclass(slots=True)
class Bad:
    reason: str
    loc: str
    detail: str = ""
    chars: int = 0
    category: str = "bad_row"  # report bucket; a man page alias is an exact duplicate of the page it names
    text: str = ""  # for undecodable lines: the line decoded with replacement characters (keeps CSV structure)


# ================================================================================================ byte level
def _open_binary(path: str):
    try:
        if path.endswith(".gz"):
            f = open(path, "rb")
            magic = f.read(2)
            f.seek(0)
            if magic == b"\x1f\x8b":
                return gzip.GzipFile(fileobj=f, mode="rb")
            return f
        return open(path, "rb")
    except OSError as e:
        raise SourceFileError(f"cannot open {path}: {e}") from e


_ALT = {"utf-8": "gb18030", "utf-8-sig": "gb18030", "gb18030": "utf-8", "gbk": "utf-8", "gb2312": "utf-8",
        "big5": "utf-8"}


def _norm_enc(enc: str) -> str:
    e = (enc or "utf-8").lower().replace("_", "-")
    return {"utf8": "utf-8", "gb-18030": "gb18030"}.get(e, e)


def sniff_encoding(sample: bytes) -> str:
    """``utf-8`` if the sample decodes as UTF-8 (a cut multi-byte character at the end is allowed), else
    ``gb18030`` if it decodes as GB18030, else ``utf-8``."""
    for enc in ("utf-8", "gb18030"):
        try:
            sample.decode(enc)
            return enc
        except UnicodeDecodeError as e:
            if e.start >= len(sample) - 4 and e.reason in ("unexpected end of data", "incomplete multibyte sequence"):
                return enc
    return "utf-8"


class _Decoder:
    """Per-line strict decoding that tells a wrong file encoding from an occasional bad byte."""

    def __init__(self, path: str, encoding: str, sample: bytes):
        enc = _norm_enc(encoding)
        if enc == "auto":
            enc = sniff_encoding(sample)
        self.encoding = enc
        self.alt = _ALT.get(enc)
        self.mismatch = False  # the sample says the file is in self.alt, not in the declared encoding
        if self.alt and sample and not sample.isascii():
            if _decodes(sample, self.alt) and (not _decodes(sample, enc) or self.alt == "utf-8"):
                # UTF-8 is self-validating: a non-ASCII sample that is valid UTF-8 is UTF-8.
                self.mismatch = True
        self.path = path

    def decode(self, raw: bytes, loc: str) -> str | Bad:
        if self.mismatch and not raw.isascii():
            return Bad("wrong_encoding", loc, f"declared {self.encoding}, file looks like {self.alt}", len(raw),
                       text=raw.decode(self.encoding, "replace"))
        try:
            return raw.decode(self.encoding)
        except UnicodeDecodeError as e:
            if self.alt and _decodes(raw, self.alt) and self.alt == "utf-8":
                return Bad("wrong_encoding", loc, f"line is {self.alt}, declared {self.encoding}", len(raw),
                           text=raw.decode(self.encoding, "replace"))
            return Bad("decode_error", loc, f"{self.encoding}: {e.reason} at byte {e.start}", len(raw),
                       text=raw.decode(self.encoding, "replace"))


def _decodes(b: bytes, enc: str) -> bool:
    try:
        b.decode(enc)
        return True
    except UnicodeDecodeError as e:
        return e.start >= len(b) - 4 and e.reason in ("unexpected end of data", "incomplete multibyte sequence")


def _iter_raw_lines(path: str, max_row_bytes: int) -> Iterator[tuple[int, bytes | Bad]]:
    """(line number, raw bytes without the newline) or (line number, Bad) for too large / broken gzip."""
    f = _open_binary(path)
    lineno = 0
    try:
        while True:
            try:
                line = f.readline(max_row_bytes + 1)
            except EOFError as e:
                yield lineno + 1, Bad("truncated_gzip", f"{path}:{lineno + 1}", str(e))
                return
            except (zlib.error, gzip.BadGzipFile, OSError) as e:
                yield lineno + 1, Bad("corrupt_gzip", f"{path}:{lineno + 1}", str(e))
                return
            if not line:
                return
            lineno += 1
            if len(line) > max_row_bytes and not line.endswith(b"\n"):
                size = len(line)
                while True:  # skip the rest of the line without keeping it
                    try:
                        more = f.readline(1 << 20)
                    except (EOFError, zlib.error, OSError) as e:
                        yield lineno, Bad("truncated_gzip", f"{path}:{lineno}", str(e))
                        return
                    size += len(more)
                    if not more or more.endswith(b"\n"):
                        break
                yield lineno, Bad("too_large", f"{path}:{lineno}", f"{size} bytes > max_row_bytes={max_row_bytes}",
                                  size)
                continue
            yield lineno, line.rstrip(b"\r\n")
    finally:
        f.close()


def _sample(path: str, n: int = 1 << 16) -> bytes:
    f = _open_binary(path)
    try:
        return f.read(n)
    except (EOFError, zlib.error, OSError):
        return b""
    finally:
        f.close()


def _iter_text_lines(path: str, encoding: str = "utf-8", max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
                     **_) -> Iterator[tuple[int, str | Bad]]:
    dec = _Decoder(path, encoding, _sample(path))
    first = True
    for lineno, raw in _iter_raw_lines(path, max_row_bytes):
        if isinstance(raw, Bad):
            yield lineno, raw
            continue
        text = dec.decode(raw, f"{path}:{lineno}")
        if first and isinstance(text, str):
            text = text.lstrip("\ufeff")
        first = False
        yield lineno, text


# ================================================================================================ text formats
def read_lines(path: str, columns: list[str] | None = None, delimiter: str = "\t", skip_header: bool = False,
               field: str = "text", **opts) -> Iterator[Rec | Bad]:
    """One record per non-blank line: ``{field: line}``, or ``columns`` split on ``delimiter`` (the last
    column takes the rest of the line, so ``label<TAB>text`` keeps tabs inside the text)."""
    for lineno, line in _iter_text_lines(path, **opts):
        if isinstance(line, Bad):
            yield line
            continue
        if skip_header and lineno == 1:
            continue
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        if columns:
            parts = line.split(delimiter, len(columns) - 1)
            if len(parts) < len(columns):
                yield Bad("missing_field", loc, f"expected {len(columns)} columns {columns}, got {len(parts)}",
                          len(line))
                continue
            yield Rec(loc, dict(zip(columns, parts)))
        else:
            yield Rec(loc, {field: line})


_TAG_TOKEN = re.compile(r"^\[?(.*?)/[A-Za-z]+\d*\]?(?:[a-z]+)?$")


def read_tagged(path: str, drop_first_token: str | None = None, **opts) -> Iterator[Rec | Bad]:
    """Word/POS tagged text (``迈向/v  充满/v``, ``[中国/ns 政府/n]nt``): tags removed, words written together (a
    space is kept only between two Latin/digit words).  ``drop_first_token``: regex for a leading id token
    (``19980101-01-001-001/m``)."""
    drop = re.compile(drop_first_token) if drop_first_token else None
    for lineno, line in _iter_text_lines(path, **opts):
        if isinstance(line, Bad):
            yield line
            continue
        toks = line.split()
        if not toks:
            continue
        if drop and drop.match(toks[0]):
            toks = toks[1:]
        out = ""
        for t in toks:
            m = _TAG_TOKEN.match(t)
            w = m.group(1) if m else t
            if not w:
                continue
            # words are written together, except two Latin/digit words that need their space back
            if out and out[-1].isascii() and out[-1].isalnum() and w[0].isascii() and w[0].isalnum():
                out += " "
            out += w
        yield Rec(f"{path}:{lineno}", {"text": out})


def read_blocks(path: str, header_delimiter: str | None = ",", header_fields: list[str] | None = None,
                body_field: str = "text", **opts) -> Iterator[Rec | Bad]:
    """Blank-line separated blocks.  With ``header_fields`` the first line is split on ``header_delimiter``
    into those fields (the last one takes the rest) and the other lines form ``body_field``
    (e.g. the medical dialogue txt: ``title,ask`` then the answer)."""
    buf: list[str] = []
    start = 0
    bad_in_block: Bad | None = None

    def emit():
        loc = f"{path}:{start}"
        if bad_in_block is not None:
            return bad_in_block
        if header_fields:
            head = buf[0]
            parts = head.split(header_delimiter, len(header_fields) - 1) if header_delimiter else [head]
            if len(parts) < len(header_fields):
                return Bad("missing_field", loc, f"header has {len(parts)} of {header_fields}", len(head))
            rec = dict(zip(header_fields, parts))
            rec[body_field] = "\n".join(buf[1:])
            if len(buf) < 2:
                return Bad("missing_field", loc, f"block has no {body_field!r} line", len(head))
            return Rec(loc, rec)
        return Rec(loc, {body_field: "\n".join(buf)})

    for lineno, line in _iter_text_lines(path, **opts):
        if isinstance(line, Bad):
            if line.reason in ("truncated_gzip", "corrupt_gzip"):
                if buf:
                    yield emit()
                yield line
                return
            bad_in_block = bad_in_block or line
            if not buf:
                start = lineno
            buf.append("")
            continue
        if not line.strip():
            if buf:
                yield emit()
                buf, bad_in_block = [], None
            continue
        if not buf:
            start = lineno
        buf.append(line)
    if buf:
        yield emit()


def read_fortune(path: str, **opts) -> Iterator[Rec | Bad]:
    """fortune(6) files: entries separated by a line ``%``.  Leading lines that start with an ANSI colour escape
    are the entry's ``title`` (e.g. ``《春晓》`` / ``作者：孟浩然``); the rest is ``text``.  Escapes are left for
    the cleaner to strip."""
    buf: list[str] = []
    start = 1
    bad: Bad | None = None

    def emit():
        if bad is not None:
            return bad
        lines = list(buf)
        while lines and not lines[0].strip():
            lines.pop(0)
        title = []
        while lines and lines[0].lstrip().startswith("\x1b["):
            title.append(strip_ansi(lines.pop(0)).strip())
        return Rec(f"{path}:{start}", {"title": "\n".join(t for t in title if t), "text": "\n".join(lines).strip("\n"),
                                       "raw": "\n".join(buf)})

    for lineno, line in _iter_text_lines(path, **opts):
        if isinstance(line, Bad):
            if line.reason in ("truncated_gzip", "corrupt_gzip"):
                yield line
                return
            bad = bad or line
            continue
        if line.strip() == "%":
            if any(x.strip() for x in buf) or bad is not None:
                yield emit()
            buf, bad, start = [], None, lineno + 1
            continue
        buf.append(line)
    if any(x.strip() for x in buf) or bad is not None:
        yield emit()


# ================================================================================================ JSON
def _nonblank_lines(path: str, **opts) -> Iterator[tuple[str, str] | Bad]:
    """(``file:line``, stripped line) for every non-blank line; undecodable lines come through as Bad."""
    for lineno, line in _iter_text_lines(path, **opts):
        if isinstance(line, Bad):
            yield line
        elif line.strip():
            yield f"{path}:{lineno}", line.strip()


def read_jsonl(path: str, **opts) -> Iterator[Rec | Bad]:
    """JSON lines: one object per non-blank line."""
    for item in _nonblank_lines(path, **opts):
        if isinstance(item, Bad):
            yield item
            continue
        loc, s = item
        try:
            obj = ujson.loads(s)
        except (ValueError, OverflowError) as e:
            yield Bad("invalid_json", loc, str(e)[:200], len(s))
            continue
        if not isinstance(obj, dict):
            yield Bad("invalid_json", loc, f"expected an object, got {type(obj).__name__}", len(s))
            continue
        yield Rec(loc, obj)


_JSON_INTERESTING = re.compile(r'["\\{}\[\]]')


class _JsonArrayStream:
    """Decode a top-level JSON array one element at a time (memory: the largest element)."""

    def __init__(self, path: str, encoding: str, max_row_bytes: int, chunk: int = 1 << 20):
        self.path = path
        self.max_row = max_row_bytes
        self.chunk = chunk
        enc = _norm_enc(encoding)
        if enc == "auto":
            enc = sniff_encoding(_sample(path))
        self.encoding = enc
        self.raw = _open_binary(path)
        self.f = io.TextIOWrapper(self.raw, encoding="utf-8-sig" if enc == "utf-8" else enc, errors="strict",
                                  newline="")
        self.buf = ""
        self.pos = 0
        self.line = 1
        self.eof = False
        self.dec = json.JSONDecoder()

    def _more(self) -> bool:
        if self.eof:
            return False
        data = self.f.read(self.chunk)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos:] + data
        self.pos = 0
        return True

    def _skip_ws(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n,":
                if self.buf[self.pos] == "\n":
                    self.line += 1
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def _skip_value(self) -> int:
        """Skip an oversized object/array without decoding it; returns its size in characters."""
        depth, in_str, size = 0, False, 0
        while True:
            m = _JSON_INTERESTING.search(self.buf, self.pos)
            if m is None:
                self.line += self.buf.count("\n", self.pos)
                size += len(self.buf) - self.pos
                self.pos = len(self.buf)
                if not self._more():
                    return size
                continue
            c = m.group()
            self.line += self.buf.count("\n", self.pos, m.end())
            size += m.end() - self.pos
            self.pos = m.end()
            if in_str:
                if c == "\\":
                    if self.pos >= len(self.buf) and not self._more():
                        return size
                    self.pos += 1
                elif c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth <= 0:
                    return size

    def __iter__(self) -> Iterator[Rec | Bad]:
        try:
            c = self._skip_ws()
            if c != "[":
                raise SourceFileError(f"{self.path}: not a JSON array (starts with {c!r})")
            self.pos += 1
            while True:
                c = self._skip_ws()
                if c == "]" or c == "":
                    return
                start_line = self.line
                loc = f"{self.path}:{start_line}"
                obj, skipped = None, False
                while True:
                    try:
                        obj, end = self.dec.raw_decode(self.buf, self.pos)
                        if end >= len(self.buf) and not self.eof and self._more():
                            continue  # a value cut at the buffer's end (e.g. a number): decode again
                        break
                    except json.JSONDecodeError as e:
                        incomplete = e.pos >= len(self.buf) - 2 or e.msg.startswith("Unterminated string")
                        if incomplete and len(self.buf) - self.pos <= self.max_row and self._more():
                            continue
                        if incomplete and len(self.buf) - self.pos > self.max_row:
                            size = self._skip_value()
                            yield Bad("too_large", loc, f"element of {size}+ chars > max_row_bytes", size)
                            skipped = True
                            break
                        err_line = start_line + self.buf.count("\n", self.pos, max(self.pos, e.pos))
                        if incomplete:
                            yield Bad("invalid_json", f"{self.path}:{err_line}", f"{e.msg} (file ends early)",
                                      len(self.buf) - self.pos)
                            return
                        yield Bad("invalid_json", f"{self.path}:{err_line}", e.msg, 0)
                        self._skip_value()  # resynchronise on the next element
                        skipped = True
                        break
                if skipped:
                    continue
                size = end - self.pos
                self.line += self.buf.count("\n", self.pos, end)
                self.pos = end
                if size > self.max_row:
                    yield Bad("too_large", loc, f"element of {size} chars > max_row_bytes", size)
                    continue
                if isinstance(obj, dict):
                    yield Rec(loc, obj)
                else:
                    yield Bad("invalid_json", loc, f"expected an object, got {type(obj).__name__}")
        except UnicodeDecodeError as e:
            alt = _ALT.get(self.encoding)
            reason = "wrong_encoding" if alt and _decodes(_sample(self.path), alt) else "decode_error"
            yield Bad(reason, f"{self.path}:{self.line}", f"{self.encoding}: {e.reason}; rest of file skipped")
        except EOFError as e:
            yield Bad("truncated_gzip", f"{self.path}:{self.line}", str(e))
        except (zlib.error, gzip.BadGzipFile) as e:
            yield Bad("corrupt_gzip", f"{self.path}:{self.line}", str(e))
        finally:
            self.f.close()


def _load_json_file(path: str, encoding: str, max_file_bytes: int):
    size = os.path.getsize(path)
    if size > max_file_bytes:
        raise SourceFileError(f"{path}: {size} bytes, above max_file_bytes={max_file_bytes} for a JSON object; "
                              f"convert it to JSON lines")
    f = _open_binary(path)
    try:
        raw = f.read()
    finally:
        f.close()
    enc = _norm_enc(encoding)
    if enc == "auto":
        enc = sniff_encoding(raw[: 1 << 16])
    text = raw.decode("utf-8-sig" if enc == "utf-8" else enc)
    return ujson.loads(text)


def _first_non_ws(path: str) -> str:
    s = _sample(path, 4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return chr(s[0]) if s else ""


def _select(obj: Any, spec: str) -> Iterator[Any]:
    """Records along a path such as ``data[].paragraphs[]``; parents' scalar fields are inherited as
    ``parent_<key>`` (only when absent)."""
    steps = [s for s in spec.split(".") if s]

    def walk(o, i, inherited):
        if i == len(steps):
            if isinstance(o, dict):
                rec = dict(o)
                for k, v in inherited.items():
                    rec.setdefault(k, v)
                yield rec
            else:
                yield o
            return
        step = steps[i]
        many = step.endswith("[]")
        key = step[:-2] if many else step
        if isinstance(o, dict):
            scal = {f"parent_{k}": v for k, v in o.items() if isinstance(v, (str, int, float))}
            inherited = {**inherited, **scal}
            o = o.get(key) if key else o
        elif key:
            return
        if o is None:
            return
        if many:
            if isinstance(o, list):
                for x in o:
                    yield from walk(x, i + 1, inherited)
        else:
            yield from walk(o, i + 1, inherited)

    yield from walk(obj, 0, {})


def read_json(path: str, records: str | None = None, encoding: str = "utf-8",
              max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
              **_) -> Iterator[Rec | Bad]:
    """A JSON file: a top-level array of objects (streamed element by element) or an object; ``records`` is a
    path (``data[].paragraphs[]``) to the records inside an object.  A file that starts with ``{`` and holds
    one object per line is read as JSON lines."""
    first = _first_non_ws(path)
    if first == "[" and not records:
        yield from _JsonArrayStream(path, encoding, max_row_bytes)
        return
    if first == "{" and not records and _looks_like_jsonl(path, encoding):
        yield from read_jsonl(path, encoding=encoding, max_row_bytes=max_row_bytes)
        return
    try:
        obj = _load_json_file(path, encoding, max_file_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceFileError(f"{path}: invalid JSON file: {e}") from e
    except (EOFError, zlib.error) as e:
        yield Bad("truncated_gzip", f"{path}:1", str(e))
        return
    items = _select(obj, records) if records else (obj if isinstance(obj, list) else [obj])
    for k, item in enumerate(items):
        loc = f"{path}:record {k}"
        if isinstance(item, dict):
            yield Rec(loc, item)
        else:
            yield Bad("invalid_json", loc, f"expected an object, got {type(item).__name__}")


def _looks_like_jsonl(path: str, encoding: str) -> bool:
    """Two lines that each parse as an object."""
    n = 0
    for _, line in _iter_text_lines(path, encoding=encoding):
        if isinstance(line, Bad):
            return False
        s = line.strip()
        if not s:
            continue
        try:
            if not isinstance(ujson.loads(s), dict):
                return False
        except ValueError:
            return False
        n += 1
        if n >= 2:
            return True
    return n >= 1


_TEXT_KEYS = ("paragraphs", "para", "content", "desc", "description")
_TITLE_KEYS = ("title", "rhythmic", "chapter", "name", "section")


def read_json_walk(path: str, text_keys: list[str] | tuple = _TEXT_KEYS, title_keys: list[str] | tuple = _TITLE_KEYS,
                   join: str = "\n", **opts) -> Iterator[Rec | Bad]:
    """Nested JSON collections (chinese-poetry): every object that has a text key whose value is a string or a
    list of strings becomes a record ``{title, author, text, ...scalars}``; lists of objects are walked into.
    Titles of enclosing objects are kept as ``collection``."""
    first = _first_non_ws(path)
    if first == "[":
        top: Iterator = (r.fields if isinstance(r, Rec) else r for r in
                         _JsonArrayStream(path, opts.get("encoding", "utf-8"),
                                          opts.get("max_row_bytes", DEFAULT_MAX_ROW_BYTES)))
    else:
        try:
            top = iter([_load_json_file(path, opts.get("encoding", "utf-8"),
                                        opts.get("max_file_bytes", DEFAULT_MAX_FILE_BYTES))])
        except (ValueError, UnicodeDecodeError) as e:
            raise SourceFileError(f"{path}: invalid JSON file: {e}") from e
    counter = [0]

    def walk(o, parent_title):
        if isinstance(o, list):
            for x in o:
                yield from walk(x, parent_title)
            return
        if not isinstance(o, dict):
            return
        title = next((o[k] for k in title_keys if isinstance(o.get(k), str) and o.get(k)), "")
        text_val = None
        for k in text_keys:
            v = o.get(k)
            if isinstance(v, str) and v.strip():
                text_val = v
                break
            if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
                text_val = join.join(v)
                break
        if text_val is not None:
            counter[0] += 1
            rec = {k: v for k, v in o.items() if isinstance(v, (str, int, float)) and k not in text_keys}
            rec.update(title=title, author=o.get("author", "") if isinstance(o.get("author"), str) else "",
                       text=text_val, collection=parent_title)
            yield Rec(f"{path}:record {counter[0]}", rec)
        for k, v in o.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                yield from walk(v, title or parent_title)
            elif isinstance(v, dict):
                yield from walk(v, title or parent_title)

    for item in top:
        if isinstance(item, Bad):
            yield item
            continue
        yield from walk(item, "")


def read_squad(path: str, **opts) -> Iterator[Rec | Bad]:
    """SQuAD-style JSON (``data[].paragraphs[].context`` + ``qas``): one record per paragraph with
    ``title``, ``context``, ``questions`` and ``answers`` (first answer text of each question)."""
    for r in read_json(path, records="data[].paragraphs[]", **opts):
        if isinstance(r, Bad):
            yield r
            continue
        f = r.fields
        qas = f.get("qas") or []
        questions = [q.get("question", "") for q in qas if isinstance(q, dict)]
        answers = []
        for q in qas:
            ans = q.get("answers") if isinstance(q, dict) else None
            answers.append(ans[0].get("text", "") if ans and isinstance(ans[0], dict) else "")
        rec = {"title": f.get("parent_title", ""), "id": f.get("id", ""), "questions": questions,
               "answers": answers}
        if "context" in f:
            rec["context"] = f["context"]
        yield Rec(r.loc, rec)


# ================================================================================================ CSV
def read_csv(path: str, encoding: str = "utf-8", delimiter: str = ",", columns: list[str] | None = None,
             header: bool = True, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, **_) -> Iterator[Rec | Bad]:
    """CSV in any encoding (``gb18030``, ``auto``...), quoted multi-line fields allowed.  A row whose bytes do
    not decode is reported (``decode_error``/``wrong_encoding``) instead of stopping the file; a row with fewer
    columns than the header is ``missing_field``; extra columns are an error of the row (``bad_csv``)."""
    bad_lines: dict[int, Bad] = {}
    line_no = [0]

    def lines():
        for lineno, text in _iter_text_lines(path, encoding=encoding, max_row_bytes=max_row_bytes):
            line_no[0] = lineno
            if isinstance(text, Bad):
                if text.reason in ("truncated_gzip", "corrupt_gzip"):
                    bad_lines[lineno] = text
                    return
                bad_lines[lineno] = text
                yield text.text + "\n"  # replacement-decoded: quotes and delimiters stay where they are
                continue
            yield text + "\n"

    old_limit = csv.field_size_limit()
    csv.field_size_limit(max(max_row_bytes, 1 << 17))
    try:
        reader = csv.reader(lines(), delimiter=delimiter)
        names = list(columns) if columns else None
        prev_end = 0
        while True:
            start = prev_end + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                prev_end = reader.line_num
                yield Bad("bad_csv", f"{path}:{start}", str(e))
                continue
            end = reader.line_num
            prev_end = end
            bad = next((bad_lines.pop(k) for k in range(start, end + 1) if k in bad_lines), None)
            for k in [k for k in bad_lines if k <= end]:
                bad_lines.pop(k)
            loc = f"{path}:{start}"
            if bad is not None:
                if bad.reason in ("truncated_gzip", "corrupt_gzip"):
                    yield bad
                    return
                bad.loc = loc
                yield bad
                continue
            if not row or not any(x.strip() for x in row):
                continue
            if names is None:
                if header:
                    names = [c.strip().lstrip("\ufeff") for c in row]
                    continue
                names = [f"col{i}" for i in range(len(row))]
            if len(row) < len(names):
                yield Bad("missing_field", loc, f"{len(row)} of {len(names)} columns {names}",
                          sum(map(len, row)))
                continue
            if len(row) > len(names):
                yield Bad("bad_csv", loc, f"{len(row)} columns, header has {len(names)}", sum(map(len, row)))
                continue
            yield Rec(loc, dict(zip(names, row)))
        for k, b in sorted(bad_lines.items()):
            yield b
    finally:
        csv.field_size_limit(old_limit)


# ================================================================================================ parquet
def read_parquet(path: str, columns: list[str] | None = None, batch_size: int = 1024,
                 max_row_bytes: int = DEFAULT_MAX_ROW_BYTES, **_) -> Iterator[Rec | Bad]:
    """Parquet, read in record batches (memory: one batch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid, pa.ArrowException) as e:
        raise SourceFileError(f"cannot read parquet file {path}: {e}") from e
    if columns:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise SourceFileError(f"{path}: parquet file has no column(s) {missing} (has {pf.schema_arrow.names})")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns):
            for rec in batch.to_pylist():
                row += 1
                loc = f"{path}:row {row}"
                size = sum(len(v) for v in rec.values() if isinstance(v, (str, bytes)))
                if size > max_row_bytes:
                    yield Bad("too_large", loc, f"{size} chars > max_row_bytes", size)
                    continue
                yield Rec(loc, rec)
    except (OSError, pa.ArrowException) as e:
        yield Bad("decode_error", f"{path}:row {row + 1}", f"parquet: {e}; rest of file skipped")


# ================================================================================================ man pages
def read_manpage(path: str, encoding: str = "utf-8", max_row_bytes: int = 8 * DEFAULT_MAX_ROW_BYTES,
                 **_) -> Iterator[Rec | Bad]:
    """A troff man page (gzip'd or not): one record ``{name, title, text}`` per page.  ``title`` is the NAME
    line (``ls - 列出目录内容``).  A ``.gz`` file that only holds another page's file name (a link stored as a
    file) is reported as an exact duplicate (``man_page_alias``)."""
    loc = f"{path}:1"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise SourceFileError(f"cannot open {path}: {e}") from e
    if path.endswith(".gz") and head != b"\x1f\x8b":
        data = open(path, "rb").read(4096)
        s = data.decode("utf-8", "replace").strip()
        if len(data) < 256 and re.fullmatch(r"[\w.+\-/]+", s or "-"):
            yield Bad("man_page_alias", loc, f"link to {s}", len(s), category="exact_dup")
        else:
            yield Bad("not_gzip", loc, "a .gz file without gzip data", len(data))
        return
    try:
        f = _open_binary(path)
        try:
            raw = f.read(max_row_bytes + 1)
        finally:
            f.close()
    except EOFError as e:
        yield Bad("truncated_gzip", loc, str(e))
        return
    except (zlib.error, gzip.BadGzipFile, OSError) as e:
        yield Bad("corrupt_gzip", loc, str(e))
        return
    if len(raw) > max_row_bytes:
        yield Bad("too_large", loc, f"page above {max_row_bytes} bytes", len(raw))
        return
    dec = _Decoder(path, encoding, raw[: 1 << 16])
    src = dec.decode(raw, loc)
    if isinstance(src, Bad):
        yield src
        return
    text = troff_to_text(src)
    m = re.search(r"^\.TH\s+\"?([^\s\"]+)\"?\s+\"?([^\s\"]+)?", src, re.M)
    name = f"{m.group(1).lower()}({m.group(2)})" if m and m.group(2) else (m.group(1).lower() if m else "")
    lines = text.split("\n")
    title = ""
    for i, ln in enumerate(lines[:-1]):
        if ln.strip().upper() in ("NAME", "名称", "名字", "NAME 名称", "名称 NAME") or ln.strip().startswith("NAME"):
            title = lines[i + 1].strip()
            break
    yield Rec(loc, {"name": name, "title": title, "text": text})


# ================================================================================================ HTML
class _HTMLBlocks(HTMLParser):
    BLOCK = {"p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "tr", "caption", "blockquote",
             "title", "div", "table", "ul", "ol", "dl", "section", "article", "body", "thead", "tbody"}
    HEAD = {"h1", "h2", "h3"}
    SKIP = {"script", "style", "head", "noscript", "nav", "footer", "header"}
    SKIP_CLASS = {"navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "breadcrumbs", "sidebar"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "param", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[tuple[str, str, int]] = []
        self.buf: list[str] = []
        self.stack: list[tuple[str, bool]] = []
        self.skip = 0
        self.pre = 0
        self.kind = "p"
        self.line = 1

    def _flush(self):
        text = "".join(self.buf)
        self.buf = []
        if self.pre:
            text = text.strip("\n")
        else:
            text = re.sub(r"\s+", " ", text).strip()
        if text:
            self.blocks.append((self.kind, text, self.line))

    def handle_starttag(self, tag, attrs):
        classes = set()
        for k, v in attrs:
            if k == "class" and v:
                classes.update(v.split())
        skip = tag in self.SKIP or bool(classes & self.SKIP_CLASS)
        if tag in self.BLOCK and not self.skip:
            self._flush()
            if tag in self.HEAD:
                self.kind = "h"
                self.line = self.getpos()[0]
            elif tag == "pre":
                self.kind = "pre"
            elif tag in ("p", "li", "dt", "dd", "tr", "blockquote", "caption", "div"):
                if self.kind != "pre":
                    self.kind = "p"
        if tag in self.VOID:
            if tag == "br" and not self.skip:
                self.buf.append("\n" if self.pre else " ")
            return
        self.stack.append((tag, skip))
        if skip:
            self.skip += 1
        if tag == "pre":
            self.pre += 1
        if tag in ("td", "th") and "".join(self.buf).strip():
            self.buf.append(" | ")  # a table row is one line, cells separated by " | "

    def handle_startendtag(self, tag, attrs):
        if tag == "br" and not self.skip:
            self.buf.append("\n" if self.pre else " ")

    def handle_endtag(self, tag):
        if not any(t == tag for t, _ in self.stack):
            return
        if tag in self.BLOCK and not self.skip:
            self._flush()  # while <pre> is still open, so its lines are kept
        while self.stack:
            t, skip = self.stack.pop()
            if skip:
                self.skip -= 1
            if t == "pre":
                self.pre -= 1
            if t == tag:
                break
        if tag in self.BLOCK and not self.skip:
            self._flush()
            self.kind = "p"

    def handle_data(self, data):
        if not self.skip:
            self.buf.append(data)

    def close(self):
        super().close()
        self._flush()


def read_html(path: str, encoding: str = "utf-8", max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
              **_) -> Iterator[Rec | Bad]:
    """HTML: navigation, scripts and tables of contents dropped; one record ``{title, text}`` per h1-h3
    section (paragraphs joined with newlines, ``<pre>`` blocks keep their lines)."""
    size = os.path.getsize(path)
    if size > max_file_bytes:
        raise SourceFileError(f"{path}: {size} bytes above max_file_bytes={max_file_bytes}")
    f = _open_binary(path)
    try:
        raw = f.read()
    except (EOFError, zlib.error, OSError) as e:
        yield Bad("truncated_gzip", f"{path}:1", str(e))
        return
    finally:
        f.close()
    enc = _norm_enc(encoding)
    m = re.search(rb"charset=[\"']?([A-Za-z0-9_\-]+)", raw[:2048])
    if enc == "auto":
        enc = m.group(1).decode().lower() if m else sniff_encoding(raw[: 1 << 16])
    try:
        text = raw.decode(enc)
    except (UnicodeDecodeError, LookupError) as e:
        alt = _ALT.get(enc)
        reason = "wrong_encoding" if alt and _decodes(raw, alt) else "decode_error"
        yield Bad(reason, f"{path}:1", f"{enc}: {e}", len(raw))
        return
    p = _HTMLBlocks()
    p.feed(text)
    p.close()
    title, body, line = "", [], 1

    def emit():
        return Rec(f"{path}:{line}", {"title": title, "text": "\n".join(body)})

    for kind, t, ln in p.blocks:
        if kind == "h":
            if body:
                yield emit()
            title, body, line = t, [], ln
        else:
            body.append(t)
    if body:
        yield emit()


# ================================================================================================ wikiextractor
_DOC_OPEN = re.compile(r'<doc\s+[^>]*?title="([^"]*)"[^>]*>')


def read_wikiextractor(path: str, max_row_bytes: int = 4 * DEFAULT_MAX_ROW_BYTES, **opts) -> Iterator[Rec | Bad]:
    """wikiextractor output (``wiki_00`` files, optionally .gz / .bz2-decompressed): ``<doc id url title>``
    ... ``</doc>`` blocks (the first line repeats the title) or its ``--json`` lines
    (``{"id","url","title","text"}``).  One record ``{title, text}`` per article."""
    title, body, start, size, in_doc, bad = "", [], 0, 0, False, None
    for lineno, line in _iter_text_lines(path, max_row_bytes=max_row_bytes, **opts):
        if isinstance(line, Bad):
            if line.reason in ("truncated_gzip", "corrupt_gzip"):
                yield line
                return
            if in_doc:
                bad = bad or line
            else:
                yield line
            continue
        s = line.strip()
        if not in_doc and s.startswith("{"):
            try:
                obj = ujson.loads(s)
            except ValueError as e:
                yield Bad("invalid_json", f"{path}:{lineno}", str(e)[:200], len(s))
                continue
            if isinstance(obj, dict):
                yield Rec(f"{path}:{lineno}", {"title": obj.get("title", ""), "text": obj.get("text", ""),
                                               "id": obj.get("id", ""), "url": obj.get("url", "")})
            continue
        m = _DOC_OPEN.match(s)
        if m:
            title, body, start, size, in_doc, bad = m.group(1), [], lineno, 0, True, None
            continue
        if s == "</doc>":
            if bad is not None:
                yield bad
            elif size > max_row_bytes:
                yield Bad("too_large", f"{path}:{start}", f"article of {size} chars", size)
            else:
                if body and body[0].strip() == title:
                    body = body[1:]
                yield Rec(f"{path}:{start}", {"title": title, "text": "\n".join(body).strip()})
            in_doc = False
            continue
        if in_doc:
            size += len(line)
            if size <= max_row_bytes:
                body.append(line)


# ================================================================================================ IE
def _spo_value(v) -> str:
    if isinstance(v, dict):
        return str(v.get("@value", next(iter(v.values()), "")))
    return "" if v is None else str(v)


def read_ie(path: str, **opts) -> Iterator[Rec | Bad]:
    """Relation extraction data: JSON lines ``{text, spo_list: [{subject, predicate, object}]}`` (DuIE 2.0
    objects are ``{"@value": ...}``) or ``text || spo_list`` lines.  Records: ``{text, triples}`` with
    ``triples`` a list of ``[subject, predicate, object]``."""
    for item in _nonblank_lines(path, **opts):
        if isinstance(item, Bad):
            yield item
            continue
        loc, s = item
        obj = None
        if s.startswith("{"):
            try:
                obj = ujson.loads(s)
            except ValueError as e:
                yield Bad("invalid_json", loc, str(e)[:200], len(s))
                continue
        elif "||" in s:
            text, _, spo = s.partition("||")
            try:
                spo_list = ujson.loads(spo.strip()) if spo.strip() else []
            except ValueError as e:
                yield Bad("invalid_json", loc, f"spo_list: {e}", len(s))
                continue
            obj = {"text": text.strip(), "spo_list": spo_list}
        else:
            yield Bad("invalid_json", loc, "neither a JSON object nor 'text || spo_list'", len(s))
            continue
        if not isinstance(obj, dict):
            yield Bad("invalid_json", loc, "not an object", len(s))
            continue
        if "text" not in obj:
            yield Bad("missing_field", loc, "no 'text'", len(s))
            continue
        triples = []
        for spo in obj.get("spo_list") or []:
            if isinstance(spo, dict):
                triples.append([_spo_value(spo.get("subject")), _spo_value(spo.get("predicate")),
                                _spo_value(spo.get("object"))])
            elif isinstance(spo, (list, tuple)) and len(spo) == 3:
                triples.append([str(x) for x in spo])
        yield Rec(loc, {"text": obj["text"], "triples": triples})


# ================================================================================================ conversations
def conversation_to_pairs(turns: list[tuple[str, str]], mode: str = "last") -> list[tuple[str, str]]:
    """(prompt, response) pairs from a conversation.  ``mode="last"``: one pair, the last assistant turn is the
    response and everything before it is joined into the prompt; ``mode="per_turn"``: one pair per assistant
    turn, each with the history before it."""
    system = "\n".join(t for r, t in turns if r == "system")
    turns = [(r, t) for r, t in turns if r != "system"]
    idx = [i for i, (r, _) in enumerate(turns) if r == "assistant" and i > 0 and turns[i - 1][0] == "user"]
    if mode == "last":
        idx = idx[-1:]
    pairs = []
    for i in idx:
        pairs.append((join_history(turns[: i - 1], turns[i - 1][1], system), turns[i][1]))
    return pairs


def _history_pairs(history) -> list[tuple[str, str]]:
    out = []
    for h in history or []:
        if isinstance(h, (list, tuple)) and len(h) == 2:
            out += [("user", str(h[0])), ("assistant", str(h[1]))]
    return out


# ================================================================================================ DPO
def _dpo_from_record(f: dict) -> dict:
    """Normalise one preference record of any supported schema to ``{prompt, chosen, rejected}``."""
    system = f.get("system") or ""
    if "conversations" in f:
        turns = normalize_turns(f["conversations"])
        system = "\n".join([system] + [t for r, t in turns if r == "system"]).strip()
        turns = [(r, t) for r, t in turns if r != "system"]
        if not turns or turns[-1][0] != "user":
            raise ValueError("conversation does not end with a user turn")
        prompt = join_history(turns[:-1], turns[-1][1], system)
        ch, rj = f.get("chosen"), f.get("rejected")
        if ch is None or rj is None:
            raise KeyError("chosen" if ch is None else "rejected")
        chosen = ch.get("value", ch.get("content")) if isinstance(ch, dict) else ch
        rejected = rj.get("value", rj.get("content")) if isinstance(rj, dict) else rj
    elif "question" in f:
        hist = _history_pairs(f.get("history"))
        prompt = join_history(hist, f["question"], system)
        chosen, rejected = f["response_chosen"], f["response_rejected"]
    elif "instruction" in f:
        q = f["instruction"] + (("\n" + f["input"]) if f.get("input") else "")
        prompt = join_history(_history_pairs(f.get("history")), q, system)
        out = f.get("output")
        if isinstance(out, list) and len(out) >= 2:
            chosen, rejected = out[0], out[1]
        else:
            chosen, rejected = f["chosen"], f["rejected"]
    elif "prompt" in f:
        prompt, chosen, rejected = f["prompt"], f["chosen"], f["rejected"]
    else:
        raise KeyError("conversations|question|instruction|prompt")
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        raise ValueError("chosen/rejected are not strings")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def read_dpo(path: str, **opts) -> Iterator[Rec | Bad]:
    """Preference pairs, any of: ``{conversations, chosen{from,value}, rejected{from,value}}``,
    ``{conversations, chosen: str, rejected: str}``, ``{instruction, input, output: [chosen, rejected]}``,
    ``{question, response_chosen, response_rejected (, history, system)}``, ``{prompt, chosen, rejected}``;
    JSON lines or a JSON array.  Records: ``{prompt, chosen, rejected}``."""
    first = _first_non_ws(path)
    src = read_json(path, **opts) if first == "[" else read_jsonl(path, **opts)
    for r in src:
        if isinstance(r, Bad):
            yield r
            continue
        try:
            yield Rec(r.loc, _dpo_from_record(r.fields))
        except KeyError as e:
            yield Bad("missing_field", r.loc, f"no {e.args[0]!r}")
        except (ValueError, TypeError, AttributeError) as e:
            yield Bad("invalid_json", r.loc, str(e))


def iter_dpo_records(path: str, **opts) -> Iterator[dict]:
    """Yield ``{"prompt", "chosen", "rejected"}`` dicts from a preference file of any schema found in
    ``../shared/data/dpo`` (see :func:`read_dpo`); malformed records are skipped.  Multi-turn prompts are
    joined with :func:`join_history`."""
    for r in read_dpo(path, **opts):
        if isinstance(r, Rec):
            yield r.fields


# ================================================================================================ registry
READERS: dict[str, Callable[..., Iterator[Rec | Bad]]] = {
    "lines": read_lines,
    "txt": read_lines,
    "tagged": read_tagged,
    "blocks": read_blocks,
    "fortune": read_fortune,
    "jsonl": read_jsonl,
    "json": read_json,
    "json_walk": read_json_walk,
    "squad": read_squad,
    "csv": read_csv,
    "parquet": read_parquet,
    "manpage": read_manpage,
    "troff": read_manpage,
    "html": read_html,
    "wikiextractor": read_wikiextractor,
    "ie": read_ie,
    "dpo": read_dpo,
}


def get_reader(name: str) -> Callable[..., Iterator[Rec | Bad]]:
    try:
        return READERS[name]
    except KeyError:
        raise ValueError(f"unknown reader {name!r}; known: {sorted(READERS)}") from None
