"""Text cleaning that does not corrupt.

Every function here takes a ``str`` and returns a ``str``; :func:`clean_text` chains them according to a
:class:`CleanOptions`.  What each step keeps and what it changes (see docs/data.md):

* Unicode: NFC (canonical, never lossy) + folding of full-width *letters and digits* to ASCII, exotic spaces to
  a plain space, zero-width characters and U+FFFD (the mark of earlier decoding damage) removed.  NFKC is NOT used: it would turn the full-width Chinese
  punctuation ``，！？：；（）`` into ASCII and ``…`` into ``...``, circled numbers into digits, ``m²`` into ``m2``.
* ASCII ``, ; : ! ? .`` written right after a CJK character (and followed by CJK, space or end) become the
  full-width mark; anything between digits (``3.14``, ``1,000``, ``10:30``) or inside English is never touched.
* Traditional to simplified Chinese through OpenCC (``t2s``).
* ANSI escape sequences, C0/C1 control characters, HTML tags/entities (when asked), troff markup (man pages).
* Runs of the same punctuation mark collapse to one (``！！！`` -> ``！``, ``。。。。`` -> ``。``; repeated ASCII
  marks only right after Chinese text, so ``for(;;)``, ``a ?? b``, ``~~del~~`` survive); ellipses are kept
  (``……``, ``...``).  Letters are never treated as punctuation and spaces are never turned into ``，``:
  either would corrupt English words and numbers inside Chinese text.
* Whitespace: runs of spaces/tabs inside a line become one space (indentation at a line start is kept, so
  code keeps its structure), a space between two CJK characters/marks is removed, spaces at line ends are
  removed, newlines are kept (3+ become 2).
"""
from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass, fields
from functools import lru_cache

__all__ = [
    "CleanOptions", "clean_text", "normalize_unicode", "to_simplified", "strip_ansi", "strip_control_chars",
    "strip_html", "troff_to_text", "collapse_repeated_punctuation", "normalize_whitespace",
    "fix_cjk_ascii_punctuation", "dice_similarity", "title_desc_prompt", "is_cjk", "split_sentences",
]

# --------------------------------------------------------------------------------------------- unicode
_FOLD = {}
for _cp in range(0xFF10, 0xFF1A):  # full-width digits
    _FOLD[_cp] = _cp - 0xFEE0
for _cp in list(range(0xFF21, 0xFF3B)) + list(range(0xFF41, 0xFF5B)):  # full-width letters
    _FOLD[_cp] = _cp - 0xFEE0
for _cp in [0x3000, 0x00A0, 0x202F, 0x205F, 0x1680] + list(range(0x2000, 0x200B)):
    _FOLD[_cp] = 0x20
for _cp in (0x200B, 0x2060, 0xFEFF, 0x00AD, 0xFFFE, 0xFFFD):  # zero width, BOM, soft hyphen, U+FFFD (garbage)
    _FOLD[_cp] = None
_FOLD[0x2028] = 0x0A  # line separator
_FOLD[0x2029] = 0x0A  # paragraph separator
_FOLD[0x0D] = None  # \r (\r\n handled before)

_NEEDS_FOLD = re.compile("[\uff10-\uff19\uff21-\uff3a\uff41-\uff5a\u3000\u00a0\u202f\u205f\u1680\u2000-\u200b"
                         "\u2060\ufeff\u00ad\ufffe\ufffd\u2028\u2029\r]")


_FW_DECIMAL = re.compile(r"(?<=[0-9])．(?=[0-9])")


def normalize_unicode(text: str) -> str:
    """NFC + fold full-width letters/digits and odd spaces; full-width punctuation is kept as is."""
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _NEEDS_FOLD.search(text):
        text = text.translate(_FOLD)
    if "．" in text:  # a full-width full stop between digits is a decimal point (２．５ -> 2.5)
        text = _FW_DECIMAL.sub(".", text)
    return text


# --------------------------------------------------------------------------------------------- OpenCC
@lru_cache(maxsize=4)
def _opencc(config: str):
    import opencc  # OpenCC==1.4.2 (pinned)

    return opencc.OpenCC(config)


def to_simplified(text: str, config: str = "t2s") -> str:
    """Traditional -> simplified Chinese with OpenCC (phrase-aware, keeps everything that is not Chinese)."""
    if not text or text.isascii():
        return text
    return _opencc(config).convert(text)


# --------------------------------------------------------------------------------------------- escapes, controls
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI ... final byte (colours: ESC[32m, ESC[m)
    r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL / ST
    r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS / SOS / PM / APC strings
    r"|\x1b[@-Z\\-_]"  # two-byte sequences
    r"|\x9b[0-?]*[ -/]*[@-~]"  # 8-bit CSI
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def strip_ansi(text: str) -> str:
    if "\x1b" not in text and "\x9b" not in text:
        return text
    return _ANSI.sub("", text)


def strip_control_chars(text: str) -> str:
    """Remove C0/C1 controls except newline and tab (tab becomes a space in :func:`normalize_unicode`)."""
    return _CONTROL.sub("", text)


# --------------------------------------------------------------------------------------------- HTML
_HTML_DROP_BLOCK = re.compile(r"<(script|style|head|noscript)\b[^>]*>.*?</\1\s*>", re.I | re.S)
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
_HTML_BREAK = re.compile(r"<\s*(br|/p|p|/div|/li|/tr|/h[1-6]|/dt|/dd|hr|/pre|/blockquote|/table)\b[^<>]*>", re.I)
_HTML_TAG_NAMES = (
    "a|abbr|address|area|article|aside|audio|b|base|bdi|bdo|blockquote|body|br|button|canvas|caption|center|cite|"
    "code|col|colgroup|dd|del|details|dfn|div|dl|dt|em|embed|fieldset|figcaption|figure|font|footer|form|h[1-6]|"
    "head|header|hr|html|i|iframe|img|input|ins|kbd|label|legend|li|link|main|mark|meta|nav|noscript|object|ol|"
    "optgroup|option|p|param|picture|pre|q|s|samp|section|select|small|source|span|strike|strong|sub|summary|sup|"
    "table|tbody|td|textarea|tfoot|th|thead|time|title|tr|tt|u|ul|var|video|wbr")
# only real HTML tag names, with attribute syntax: ``List<String>``, ``a<b and c>d`` are not tags
_HTML_TAG = re.compile(
    rf"</?(?:{_HTML_TAG_NAMES})(?:\s+[A-Za-z_:][-\w:.]*(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s'\"=<>`]+))?)*\s*/?>",
    re.I)
_HTML_ENTITY = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]{1,31}|#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6});")


def strip_html(text: str) -> str:
    """Remove HTML tags (block ends become newlines), comments, scripts/styles; decode entities.

    Only real tags are removed: ``a<b`` or ``x < y > z`` stay as they are.
    """
    if "<" in text:
        text = _HTML_DROP_BLOCK.sub("", text)
        text = _HTML_COMMENT.sub("", text)
        text = _HTML_BREAK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text and _HTML_ENTITY.search(text):
        text = html.unescape(text)
    return text


# --------------------------------------------------------------------------------------------- troff
_TROFF_SPECIAL = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "bu": "•", "co": "©", "rg": "®", "tm": "™", "lq": "“", "rq": "”",
    "oq": "‘", "cq": "’", "dq": '"', "aq": "'", "mu": "×", "de": "°", "+-": "±", ">=": "≥", "<=": "≤", "!=": "≠",
    "->": "→", "<-": "←", "ua": "↑", "da": "↓", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "br": "|",
    "at": "@", "sh": "#", "Do": "$", "ga": "`", "aa": "´", "ul": "_", "sq": "□", "ci": "○", "lh": "☜", "rh": "☞",
    "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "pl": "+", "eq": "=", "sc": "§", "ps": "¶", "dg": "†", "ct": "¢",
    "Po": "£", "Ye": "¥", "Eu": "€", "eu": "€", "la": "⟨", "ra": "⟩", "Ba": "|", "or": "|", "rn": "‾", "ru": "_",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "sp": " ", "Tm": "™", "R": "®",
}
_TROFF_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "Lq": "“", "Rq": "”", "(lq": "“", "(rq": "”"}
_TROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"f(?:\[[^\]]*\]|\([A-Za-z0-9]{2}|[A-Za-z0-9])"  # font
    r"|s[+-]?(?:\d+|\(\d\d|\[[^\]]*\]|'[^']*')"  # size
    r"|\((?P<sp2>..)"  # \(xx special character
    r"|\[(?P<spn>[^\]]+)\]"  # \[name]
    r"|\*(?:\((?P<st2>..)|\[(?P<stn>[^\]]+)\]|(?P<st1>.))"  # string interpolation
    r"|n[+-]?(?:\(..|\[[^\]]*\]|.)"  # number register
    r"|[hvwlLoXDZbNRHS]'[^']*'"  # \h'..' and friends
    r"|[kgzYVmM](?:\(..|\[[^\]]*\]|.)"
    r"|\"[^\n]*"  # comment to end of line
    r"|(?P<one>.)"  # one-character escapes
    r")",
    re.S,
)
_ONE_CHAR = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ", ".": ".", "'": "'", "`": "`",
             "_": "_", "%": "", "&": "", "|": "", "^": "", ")": "", ",": "", "/": "", ":": "", "c": "", "{": "",
             "}": "", "!": "", "p": "", "a": "", "d": "", "u": "", "r": "", "E": "", "x": ""}

_MDOC_CALLABLE = {
    "Ad", "An", "Ar", "Cd", "Cm", "Dv", "Er", "Ev", "Fa", "Fl", "Fn", "Ft", "Ic", "Li", "Ms", "Mt", "Nm", "No",
    "Ns", "Op", "Oo", "Oc", "Pa", "Sy", "Em", "Va", "Vt", "Xr", "Dq", "Do", "Dc", "Pq", "Po", "Pc", "Ql", "Qq",
    "Qo", "Qc", "Sq", "So", "Sc", "Bq", "Bo", "Bc", "Brq", "Bro", "Brc", "Aq", "Ao", "Ac", "Eq", "Eo", "Ec", "Tn",
    "Ux", "Bx", "Ox", "Nx", "Fx", "At", "St", "Lk", "Pf", "Sx", "Tg",
}
_TROFF_SKIP = {
    "TH", "Dd", "Dt", "Os", "so", "ds", "nr", "de", "am", "rm", "rn", "tr", "cs", "ft", "ps", "vs", "ll", "in",
    "ti", "ad", "na", "hy", "nh", "ne", "bp", "pl", "ns", "rs", "ss", "ta", "tc", "lc", "ul", "cu", "uf", "ig",
    "PD", "UC", "DT", "IX", "ie", "el", "if", "ev", "mk", "rt", "wh", "ch", "it", "em", "cc", "c2", "eo", "ec",
    "lf", "nm", "nn", "pc", "pm", "tm", "ab", "ex", "fl", "hc", "hw", "lt", "mc", "pi", "pn", "po", "sv", "os",
    "Bl", "El", "Bd", "Ed", "Bk", "Ek", "Rs", "Re", "Sm", "Ud", "Lb", "In", "Fd", "hla", "hlm", "hpf", "hcode",
    "cflags", "mso", "ftr", "fam", "nroff", "troff", "EE", "EX", "ME", "MT", "UE", "UR", "YS", "SY", "OP", "ce",
    "fp", "pso", "blm", "lsm", "warn", "TS", "TE", "T&", "EQ", "EN", "ls",
}
_TROFF_BREAK = {"PP", "LP", "P", "Pp", "sp", "br", "RS", "RE", "HP", "Lp", "RS", "fi", "Ss", "Sh", "SH", "SS"}
_TROFF_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI", "SB"}


def _troff_inline(line: str) -> str:
    def repl(m: re.Match) -> str:
        if m.group("sp2") is not None:
            return _TROFF_SPECIAL.get(m.group("sp2"), "")
        if m.group("spn") is not None:
            name = m.group("spn")
            if name.startswith("u") and re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
                return chr(int(name[1:], 16))
            return _TROFF_SPECIAL.get(name, "")
        for g in ("st2", "stn", "st1"):
            if m.group(g) is not None:
                return _TROFF_STRINGS.get(m.group(g), "")
        if m.group("one") is not None:
            c = m.group("one")
            return _ONE_CHAR.get(c, c)
        return ""

    return _TROFF_ESCAPE.sub(repl, line)


def _troff_args(rest: str) -> list[str]:
    """Split request arguments, honouring double quotes."""
    out, cur, quoted, had = [], [], False, False
    i = 0
    while i < len(rest):
        c = rest[i]
        if c == '"':
            if quoted and i + 1 < len(rest) and rest[i + 1] == '"':
                cur.append('"')
                i += 2
                continue
            quoted = not quoted
            had = True
        elif c in " \t" and not quoted:
            if cur or had:
                out.append("".join(cur))
            cur, had = [], False
        else:
            cur.append(c)
        i += 1
    if cur or had:
        out.append("".join(cur))
    return out


def troff_to_text(source: str) -> str:
    """Render troff/man(7)/mdoc(7) source to plain text.

    Section headings (``.SH``) become lines of their own preceded by a blank line; paragraphs are separated by
    newlines; filled text lines of one paragraph are joined with a space (removed later between CJK
    characters); ``.nf`` blocks keep their line breaks.  Font changes, size changes, comments, macro
    definitions and conditionals are dropped; special characters (``\\(em``, ``\\-``) become their Unicode form.
    """
    renderer = _TroffRenderer()
    for raw in source.split("\n"):
        renderer.feed(raw)
    return renderer.text()


class _TroffRenderer:
    """The state of one troff rendering: lines out, the paragraph being filled, fill mode, a skipped block, a
    pending ``.TP`` tag and the page name (mdoc macros print it)."""

    def __init__(self):
        self.out_lines: list[str] = []
        self.para: list[str] = []
        self.nofill = False
        self.skip_until: str | None = None
        self.pending_tag = False
        self.name = ""

    def text(self) -> str:
        self.flush()
        text = "\n".join(self.out_lines)
        text = re.sub(r"\n{3,}", "\n\n", text)
        return text.strip("\n")

    def flush(self) -> None:
        if self.para:
            self.out_lines.append(" ".join(p for p in self.para if p))
            self.para.clear()

    def feed(self, raw: str) -> None:
        if self.skip_until is not None:
            end = self.skip_until
            if (end == ".." and raw.strip().startswith("..")) or (end != ".." and end in raw):
                self.skip_until = None
            return
        line = raw.rstrip()
        if not line:
            if self.nofill:
                self.flush()
                self.out_lines.append("")
            return
        if line[0] in ".'":
            text = self._request(line[1:].lstrip())
            if text is None:
                return
        else:
            text = _troff_inline(line)
            text = text if self.nofill else text.strip()
        self._emit(text)

    def _emit(self, text: str) -> None:
        if not text and not self.nofill:
            return
        if self.pending_tag:
            self.out_lines.append(text.strip())
            self.pending_tag = False
        elif self.nofill:
            self.out_lines.append(text)
        else:
            self.para.append(text)

    def _request(self, body: str) -> str | None:
        """A request line (after its dot): the text it prints, or None when it only changes the layout."""
        if body.startswith('\\"') or body.startswith("\\#") or not body:
            return None
        parts = body.split(None, 1)
        req = parts[0]
        rest = parts[1] if len(parts) > 1 else ""
        if req in ("de", "de1", "am", "ig"):
            self.skip_until = ".."
            return None
        if req in ("if", "ie", "el"):
            if "\\{" in rest and "\\}" not in rest:
                self.skip_until = "\\}"  # skip a multi-line conditional block
            return None
        if self._layout(req, rest) or req in _TROFF_SKIP:
            return None
        return self._request_text(req, rest)

    def _layout(self, req: str, rest: str) -> bool:
        """Apply a request that sets the page name, fill mode, headings, tags or breaks; False for others."""
        if req == "TH" or req == "Dt":
            args = _troff_args(rest)
            if args:
                self.name = _troff_inline(args[0]).strip().lower()
        elif req in ("nf", "EX", "Bd", "fi", "EE", "Ed"):
            self.flush()
            self.nofill = req in ("nf", "EX", "Bd")
        elif req in ("SH", "Sh", "SS", "Ss"):
            self.flush()
            heading = _troff_inline(" ".join(_troff_args(rest))).strip()
            if self.out_lines and self.out_lines[-1] != "":
                self.out_lines.append("")
            if heading:
                self.out_lines.append(heading)
        elif req in ("TP", "TQ"):
            self.flush()
            self.pending_tag = True
        elif req in ("IP", "It"):
            self.flush()
            args = _troff_args(rest)
            if req == "IP":
                tag = _troff_inline(args[0]).strip() if args else ""
            else:
                tag = _troff_inline(_mdoc_line(args, self.name)).strip()
            if tag:
                self.out_lines.append(tag)
        elif req in _TROFF_BREAK:
            self.flush()
        else:
            return False
        return True

    def _request_text(self, req: str, rest: str) -> str | None:
        """The text of a font, alternating-font or mdoc request; None for an unknown request (dropped rather
        than leaking macro names into the text)."""
        args = _troff_args(rest)
        if req in ("B", "I", "SM", "SB", "R"):
            text = " ".join(args)
        elif req in _TROFF_ALTERNATING:
            text = "".join(args)
        elif req in _MDOC_CALLABLE or req in ("Nd", "Xo", "Xc", "D1", "Dl"):
            text = _mdoc_line([req] + args, self.name)
            if req == "Nd":
                text = "- " + text
        elif len(req) <= 3 and req[:1].isalpha():
            return None
        else:
            text = " ".join(args)
        return _troff_inline(text).strip()


def _mdoc_line(tokens: list[str], name: str) -> str:
    out: list[str] = []
    no_space = False
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _MDOC_CALLABLE or t in ("Nd", "Xo", "Xc", "D1", "Dl", "It"):
            if t == "Nm" and (i + 1 >= len(tokens) or tokens[i + 1] in _MDOC_CALLABLE):
                out.append(name)
            elif t == "Fl":
                nxt = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1] not in _MDOC_CALLABLE else ""
                out.append("-" + nxt)
                i += 2 if nxt else 1
                continue
            elif t == "Ns":
                no_space = True
            i += 1
            continue
        if no_space and out:
            out[-1] = out[-1] + t
            no_space = False
        else:
            out.append(t)
        i += 1
    return " ".join(out)


# --------------------------------------------------------------------------------------------- CJK helpers
_CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_CJK_PUNCT = "\u3000-\u303f\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65\u2014\u2018\u2019\u201c\u201d\u2026\u00b7"
_CJK_CHAR = re.compile(f"[{_CJK_RANGES}]")


def is_cjk(ch: str) -> bool:
    return bool(_CJK_CHAR.match(ch))


_ASCII_TO_FULL = {",": "，", ";": "；", ":": "：", "!": "！", "?": "？", ".": "。"}
# ASCII mark right after a CJK character, followed by CJK / CJK punctuation / whitespace / end.
_CJK_ASCII_PUNCT = re.compile(f"(?<=[{_CJK_RANGES}])([,;:!?]|\\.(?!\\.))(?=[{_CJK_RANGES}{_CJK_PUNCT}]|\\s|$)")


def fix_cjk_ascii_punctuation(text: str) -> str:
    """``房间太小,其他一般.`` -> ``房间太小，其他一般。``; ``3.14``, ``1,000``, ``e.g.`` and code stay as they are."""
    if not any(c in text for c in ",;:!?."):
        return text
    return _CJK_ASCII_PUNCT.sub(lambda m: _ASCII_TO_FULL[m.group(1)], text)


# --------------------------------------------------------------------------------------------- punctuation runs
_FW_RUN = re.compile(r"([，。！？；：、～·])\1+")
_FW_COMMA_MIX = re.compile(r"[，、]{2,}")
# ASCII , ! ? ; only in Chinese context: ``for(;;)``, ``a ?? b``, ``!!x``, ``1,,,2`` are left alone (and ~ never:
# ``~~删除线~~`` is markdown)
_ASCII_RUN_CJK = re.compile(f"(?<=[{_CJK_RANGES}{_CJK_PUNCT}])([,!?;])\\1+")
_ELLIPSIS_RUN = re.compile(r"…{3,}")
_DOT_RUN = re.compile(r"\.{4,}")


def collapse_repeated_punctuation(text: str) -> str:
    """``！！！`` -> ``！``, ``。。。。`` -> ``。``, ``，，`` -> ``，``, ``好!!!`` -> ``好!``, ``………`` -> ``……``,
    ``.....`` -> ``...``.

    Only punctuation marks are considered; letters (``ss`` in ``class``), digits and newlines never are, and
    repeated ASCII marks are collapsed only right after Chinese text, so code and data keep them."""
    text = _FW_RUN.sub(r"\1", text)
    text = _FW_COMMA_MIX.sub(lambda m: m.group(0)[0], text)
    text = _ASCII_RUN_CJK.sub(r"\1", text)
    text = _ELLIPSIS_RUN.sub("……", text)
    text = _DOT_RUN.sub("...", text)
    return text


# --------------------------------------------------------------------------------------------- whitespace
_SPACES = re.compile(r"(?<=[^\s])[ \t\f\v]+")  # a run after a visible character: indentation is kept
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{_CJK_RANGES}{_CJK_PUNCT}]) (?=[{_CJK_RANGES}{_CJK_PUNCT}])")
_TRAILING = re.compile(r"[ \t\f\v]+\n")
_BLANK_LINES = re.compile(r"\n[ \t\f\v]+(?=\n)")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str, keep_newlines: bool = True) -> str:
    """Runs of spaces/tabs inside a line become one space, spaces at line ends and on blank lines go, a space
    between two Chinese characters/marks goes, 3+ newlines become 2.  Indentation at the start of a line is
    kept (code in answers); leading/trailing whitespace of the whole text is removed."""
    text = _SPACES.sub(" ", text)
    if " " in text:
        text = _SPACE_BETWEEN_CJK.sub("", text)
    if "\n" in text:
        if keep_newlines:
            text = _TRAILING.sub("\n", text)
            text = _BLANK_LINES.sub("\n", text)
            text = _MANY_NEWLINES.sub("\n\n", text)
        else:
            text = _SPACE_BETWEEN_CJK.sub("", re.sub(r"\s*\n\s*", " ", text))
    return text.strip(" \t\f\v\n")


# --------------------------------------------------------------------------------------------- pipeline
@dataclass
class CleanOptions:
    ansi: bool = True
    control: bool = True
    html: bool = False
    unicode: bool = True
    t2s: bool = True
    cjk_punct: bool = True
    collapse_punct: bool = True
    whitespace: bool = True
    keep_newlines: bool = True

    @classmethod
    def from_dict(cls, d: dict | None) -> "CleanOptions":
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown cleaning option(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


DEFAULT_OPTIONS = CleanOptions()


def clean_text(text: str, options: CleanOptions | None = None) -> str:
    """Run the cleaning steps in a fixed, safe order and return the cleaned text."""
    o = options or DEFAULT_OPTIONS
    if not text:
        return ""
    spaces = lambda t: normalize_whitespace(t, keep_newlines=o.keep_newlines)  # noqa: E731
    steps = ((o.ansi, strip_ansi), (o.html, strip_html), (o.control, strip_control_chars),
             (o.unicode, normalize_unicode), (o.t2s, to_simplified), (o.whitespace, spaces),
             (o.collapse_punct, collapse_repeated_punctuation), (o.cjk_punct, fix_cjk_ascii_punctuation),
             (o.whitespace, spaces))  # punctuation fixes can leave spaces behind: normalise once more
    for on, step in steps:
        if on:
            text = step(text)
    return text


# --------------------------------------------------------------------------------------------- reference prompt rule
def dice_similarity(a: str, b: str) -> float:
    """Dice coefficient of the two strings' character sets (the reference's title/description measure)."""
    sa, sb = set(a), set(b)
    total = len(sa) + len(sb)
    return 0.0 if total == 0 else 2 * len(sa & sb) / total


_END_MARK = set("。！？!?；;：:…")


def title_desc_prompt(title: str, desc: str, threshold: float = 0.90, prefer: str = "title") -> str:
    """The reference's rule for sources with a title and a description (baike_qa, medical dialogue, webtext).

    If title and description are near-identical (character-set Dice >= ``threshold``) keep only one of them
    (``prefer``: ``"title"``, ``"desc"`` or ``"longer"``); otherwise the prompt is the title followed by the
    description, separated by a newline unless the title already ends with a sentence mark, so the title's
    last word does not run into the description.
    """
    title, desc = (title or "").strip(), (desc or "").strip()
    if not desc:
        return title
    if not title:
        return desc
    if desc.startswith(title):
        return desc
    if dice_similarity(title, desc) >= threshold:
        if prefer == "desc":
            return desc
        if prefer == "longer":
            return desc if len(desc) > len(title) else title
        return title
    sep = "" if title[-1] in _END_MARK else "\n"
    return f"{title}{sep}{desc}"


_SENT_END = re.compile(r"(?<=[。！？!?；;…\n])")


def split_sentences(text: str) -> list[str]:
    """Split after Chinese/ASCII sentence marks (the mark stays with its sentence); no empty pieces."""
    return [s for s in _SENT_END.split(text) if s]
