"""Tokenizer contract (fixed ids, [EOS] once, no [UNK], exact round trips) and scalable training (streamed
inputs split across processes, bounded count table, same result as in-process counting)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from config import EOS_ID, SPECIAL_TOKENS, UNK_ID, sentinel_token
from conftest import ROOT
from helpers import require_shared_data
from model.tokenizer.build import (KEEP_CHARS, check_tokenizer, count_pieces, load_tokenizer, pre_tokenizer,
                                   save_tokenizer, train_from_counts, train_tokenizer)
from model.tokenizer.counting import (CountStats, PieceCounts, PieceSplitter, chunk_piece, expand_inputs,
                                      iter_range_lines, plan_units)

ROUND_TRIP = [
    "今天天气很好，我们去公园散步吧！",
    "Hello, world! This is a test of the tokenizer.",
    "3.14159 + 2.71828 = 5.85987; 1,000,000 元",
    "「引号」《书名》（括号）——破折号……省略号；分号：冒号？问号！",
    "第一行\n第二行\n\n第四行\t制表符  两个空格   三个",
    "mixed 中英 text: GPT-4o 的 API 调用 costs $0.005/1K tokens.",
    "  leading and trailing spaces  ",
    "def f(x):\n\treturn x ** 2  # 平方\n",
    "emoji 😀🎉 and rare 𠀀𪚥 characters, ü é ñ",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    out = []
    while len(out) < n:
        cp = rng.choice([rng.randint(0x20, 0x7E), rng.randint(0x4E00, 0x9FFF), rng.randint(0xA0, 0xFFFF),
                         rng.randint(0x10000, 0x10FFFF), rng.randint(0, 0x1F)])
        if 0xD800 <= cp <= 0xDFFF:
            continue
        out.append(chr(cp))
    return "".join(out)


@pytest.fixture(scope="module")
def corpus_lines(demo_data):
    return Path(demo_data["corpus"]).read_text(encoding="utf-8").splitlines() + ROUND_TRIP[:3]


@pytest.fixture(scope="module")
def tokenizers(corpus_lines):
    return {
        "char": train_tokenizer(corpus_lines, vocab_size=1024, token_type="char"),
        "byte": train_tokenizer(corpus_lines, vocab_size=1024, token_type="byte"),
        "spm_unigram": train_tokenizer(corpus_lines, vocab_size=1024, sentencepiece="unigram"),
        "spm_bpe": train_tokenizer(corpus_lines, vocab_size=1024, sentencepiece="bpe"),
    }


KINDS = ["char", "byte", "spm_unigram", "spm_bpe"]


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_ids_sentinels_and_eos_once(tokenizers, kind):
    tok = tokenizers[kind]
    check_tokenizer(tok)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i
    for i in range(100):
        assert tok.convert_tokens_to_ids(sentinel_token(i)) == 7 + i
    # BPE fills the vocabulary exactly; sentencepiece may stop short on a small corpus, never above
    assert len(tok) == 1024 if kind in ("char", "byte") else 900 < len(tok) <= 1024
    for text in ["你好", "", "a b", "\n"]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == EOS_ID and ids.count(EOS_ID) == 1, (text, ids)
    # a sentinel written in the text is one token (span corruption writes them into targets)
    ids = tok(f"前{sentinel_token(3)}后", add_special_tokens=False)["input_ids"]
    assert 7 + 3 in ids


@pytest.mark.parametrize("kind", KINDS)
def test_newline_and_tab_are_tokens(tokenizers, kind):
    tok = tokenizers[kind]
    if kind == "byte":
        assert tok.convert_tokens_to_ids("Ċ") != UNK_ID and tok.convert_tokens_to_ids("ĉ") != UNK_ID
    else:
        for ch in KEEP_CHARS:
            assert ch in tok.get_vocab(), repr(ch)
        ids = tok("甲\n乙\t丙", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids("\n") in ids and tok.convert_tokens_to_ids("\t") in ids


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_exact(tokenizers, kind):
    tok = tokenizers[kind]
    for text in ROUND_TRIP:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == text, (kind, text)


@pytest.mark.parametrize("kind", KINDS)
def test_no_unk_for_random_unicode(tokenizers, kind):
    tok = tokenizers[kind]
    rng = random.Random(7)
    for _ in range(60):
        text = _random_unicode(rng, rng.randint(1, 40))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert UNK_ID not in ids, (kind, text)


def test_plain_autotokenizer_loads_the_saved_folder(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    for kind in ("char", "spm_unigram"):
        d = save_tokenizer(tokenizers[kind], tmp_path / kind)
        plain = AutoTokenizer.from_pretrained(str(d))
        text = ROUND_TRIP[4]
        assert plain(text)["input_ids"] == tokenizers[kind](text)["input_ids"]
        assert load_tokenizer(d).decode(plain(text)["input_ids"], skip_special_tokens=True) == text


def test_sentencepiece_option_keeps_its_model_file(tokenizers, tmp_path, tiny_model_dir):
    import sentencepiece as spm
    from model.chat_model import TextToTextModel
    from model.data.checkpoint import save_model_folder
    from model.tokenizer.build import SENTENCEPIECE_FILE
    for kind in ("spm_unigram", "spm_bpe"):
        d = save_tokenizer(tokenizers[kind], tmp_path / kind)
        sp = spm.SentencePieceProcessor(model_file=str(d / SENTENCEPIECE_FILE))
        assert sp.get_piece_size() > 100
        assert "".join(sp.encode(ROUND_TRIP[0], out_type=str)).replace("▁", " ") == ROUND_TRIP[0]
        # a model folder made from that tokenizer folder keeps it too
        model = TextToTextModel.from_pretrained(str(tiny_model_dir))
        folder = save_model_folder(model, load_tokenizer(d), tmp_path / f"model_{kind}")
        assert (folder / SENTENCEPIECE_FILE).read_bytes() == (d / SENTENCEPIECE_FILE).read_bytes()
    assert not (save_tokenizer(tokenizers["char"], tmp_path / "c") / SENTENCEPIECE_FILE).exists()


# ---------------------------------------------------------------------------------------------- counting
def test_char_splitter_matches_the_hf_pre_tokenizer():
    """The fast regex splitter used for counting must cut exactly where the tokenizer's pre-tokeniser does."""
    rng = random.Random(3)
    texts = ROUND_TRIP + [_random_unicode(rng, 80) for _ in range(200)] + ["a  b   c ▁x ▁ ▁▁y", " ", "▁"]
    texts = [t.replace("\x00", "") for t in texts]
    import unicodedata

    texts = [unicodedata.normalize("NFC", t) for t in texts]
    pre = pre_tokenizer("char")
    splitter = PieceSplitter("char", chunk_chars=0)
    for t in texts:
        assert splitter([t]) == [p for p, _ in pre.pre_tokenize_str(t)], repr(t)


def test_chunking_bounds_pieces_and_keeps_text():
    splitter = PieceSplitter("char", chunk_chars=4)
    text = "中华人民共和国成立于一九四九年，首都北京 international"
    pieces = splitter([text])
    assert max(len(p.lstrip("▁")) for p in pieces) <= 4
    assert "".join(pieces) == text.replace(" ", "▁")
    # byte level: chunks end on character boundaries, so each decodes on its own
    byte_pieces = chunk_piece("中华人民共和国".encode().decode("latin-1"), 7, byte_level=False)
    assert "".join(byte_pieces) == "中华人民共和国".encode().decode("latin-1")
    bl = [p for p, _ in pre_tokenizer("byte").pre_tokenize_str("中华人民共和国成立")][0]
    chunks = chunk_piece(bl, 7, byte_level=True)
    assert "".join(chunks) == bl and all(len(c) <= 7 for c in chunks)
    from tokenizers import decoders

    dec = decoders.ByteLevel()
    assert "".join(dec.decode([c]) for c in chunks) == "中华人民共和国成立"


def test_byte_ranges_never_lose_or_repeat_lines(tmp_path):
    import model.tokenizer.counting as tc

    rng = random.Random(5)
    files, expected = [], []
    for k in range(3):
        lines = ["".join(rng.choice("ab中文,\r ") for _ in range(rng.randint(0, 25))) for _ in range(rng.randint(0, 30))]
        data = "\n".join(lines) + ("\n" if k % 2 else "")
        p = tmp_path / f"f{k}.txt"
        p.write_bytes(data.encode())
        files.append(p)
        if data:
            got = data.split("\n")
            expected += [l[:-1] if l.endswith("\r") else l for l in (got[:-1] if data.endswith("\n") else got)]
    old = tc.READ_BLOCK
    try:
        for block in (1, 3, 17, 1 << 20):
            tc.READ_BLOCK = block
            for parts in (1, 2, 5, 11):
                stats, seen = CountStats(), []
                for units in plan_units(files, parts):
                    for u in units:
                        seen += list(iter_range_lines(u, stats))
                assert seen == expected, (block, parts)
    finally:
        tc.READ_BLOCK = old


def test_thinning_bounds_the_table_and_keeps_counts_unbiased():
    rng = random.Random(11)
    table = PieceCounts(max_pieces=2000, seed=1)
    true = Counter()
    splitter_input = []
    for _ in range(60000):  # a Zipf head plus a long tail of unique pieces
        p = f"h{int(rng.paretovariate(1.0))}" if rng.random() < 0.5 else f"t{rng.randrange(10**9)}"
        true[p] += 1
        splitter_input.append(p)
        table.counts[p] = table.counts.get(p, 0.0) + 1.0
        if len(table.counts) > table.max_pieces:  # what a counting worker does between chunks
            table.thin(table.max_pieces // 2)
    assert len(table) <= 2000 and not table.exact
    assert abs(table.mass() - 60000) / 60000 < 0.05  # total weight is unbiased
    heavy = [p for p, c in true.most_common(5)]
    for p in heavy:  # pieces far above the threshold keep their counts
        assert abs(table.counts[p] - true[p]) <= table.tau * 2
    tail_true = sum(c for p, c in true.items() if p.startswith("t"))
    tail_est = sum(c for p, c in table.counts.items() if p.startswith("t"))
    assert abs(tail_est - tail_true) / tail_true < 0.1
    assert set("t0123456789") <= table.alphabet | set("".join(table.counts))


def test_processes_count_exactly_what_one_process_counts(tmp_path, corpus_lines, monkeypatch):
    import model.tokenizer.counting as tc

    monkeypatch.setattr(tc, "MIN_BYTES_PER_PROCESS", 1)  # small files: still start the worker processes
    contexts = []
    real_get_context = tc.mp.get_context
    monkeypatch.setattr(tc.mp, "get_context", lambda m=None: contexts.append(m) or real_get_context(m))
    half = len(corpus_lines) // 2
    (tmp_path / "a.txt").write_text("\n".join(corpus_lines[:half]) + "\n", encoding="utf-8")
    pd.DataFrame({"text": corpus_lines[half:], "n": range(len(corpus_lines) - half)}).to_parquet(
        tmp_path / "b.parquet", row_group_size=50)
    files = f"{tmp_path}/*.txt,{tmp_path}/*.parquet"
    multi = count_pieces(files=files, num_proc=2, show_progress=False)
    assert contexts, "no worker process was started"
    single = count_pieces(corpus_lines)
    assert multi.exact and multi.counts == single.counts
    assert multi.stats.texts == single.stats.texts == len(corpus_lines)
    a = train_from_counts(multi, vocab_size=1024)
    b = train_tokenizer(corpus_lines, vocab_size=1024)
    assert a.get_vocab() == b.get_vocab()


def test_capped_table_trains_about_as_well_as_exact_counts(corpus_lines):
    exact = train_tokenizer(corpus_lines, vocab_size=1024)
    counts = count_pieces(corpus_lines * 3, max_pieces=200, seed=2)
    assert len(counts) <= 200 and not counts.exact
    capped = train_from_counts(counts, vocab_size=1024)

    def cpt(tok):
        return sum(map(len, corpus_lines)) / sum(len(tok(l, add_special_tokens=False)["input_ids"])
                                                 for l in corpus_lines)

    assert cpt(capped) > 0.95 * cpt(exact)


def test_bad_inputs_are_reported_by_file_row_and_field(tmp_path):
    (tmp_path / "bad.txt").write_bytes("好的\n".encode() + b"\xff\xfe broken\n" + "再见\n".encode())
    counts = count_pieces(files=str(tmp_path / "bad.txt"), num_proc=1)
    assert counts.stats.skipped == 1 and "bad.txt" in counts.stats.skipped_examples[0]
    assert counts.stats.texts == 2
    (tmp_path / "x.jsonl").write_text('{"text": "一"}\nnot json\n{"text": 3}\n{"other": "二"}\n', encoding="utf-8")
    counts = count_pieces(files=str(tmp_path / "x.jsonl"), columns=["text"], num_proc=1)
    assert counts.stats.skipped == 2 and all("x.jsonl" in e for e in counts.stats.skipped_examples)
    pd.DataFrame({"prompt": ["问"], "response": ["答"]}).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet.*text"):
        count_pieces(files=str(tmp_path / "p.parquet"), columns=["text"], num_proc=1)
    both = count_pieces(files=str(tmp_path / "p.parquet"), num_proc=1)  # default: every string column
    assert set(both.counts) == {"问", "答"}
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_inputs(str(tmp_path / "nothing_here*.txt"))
    with pytest.raises(TypeError):
        count_pieces("corpus.txt")


def test_cli_trains_and_saves_a_plain_folder(tmp_path, demo_data):
    out = tmp_path / "tok"
    r = subprocess.run([sys.executable, "train_tokenizer.py", f"--inputs={demo_data['corpus']}",
                        f"--output_dir={out}", "--vocab_size=800", "--num_proc=2", "--num_sentinels=10",
                        "--show_progress=False"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["vocab_size"] == 800 and stats["exact"]
    assert json.loads((out / "training_stats.json").read_text())["texts"] == stats["texts"]
    tok = load_tokenizer(out)
    assert tok.convert_tokens_to_ids(sentinel_token(9)) == 16 and len(tok) == 800
    r = subprocess.run([sys.executable, "train_tokenizer.py", "--inputs=x.txt", "--vocab_sise=10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "vocab_sise" in r.stderr


def test_real_corpus_capped_counts_keep_compression():
    """On real text, a count table capped at half the distinct pieces trains within 1% of exact counts."""
    d = require_shared_data("pretrain/clue-corpus-small")
    lines = (d / "corpora_CLUECorpusSmall_sampled.txt").read_text(encoding="utf-8").splitlines()
    lines += [l.split("\t", 1)[-1] for l in (d / "corpora_chnsenticorp.txt").read_text(encoding="utf-8").splitlines()]
    random.Random(0).shuffle(lines)
    train, held = lines[:-300], lines[-300:]
    exact_counts = count_pieces(train)
    capped_counts = count_pieces(train, max_pieces=len(exact_counts) // 2, seed=1)
    assert exact_counts.exact and not capped_counts.exact and len(capped_counts) <= len(exact_counts) // 2
    exact = train_from_counts(exact_counts, vocab_size=8000)
    capped = train_from_counts(capped_counts, vocab_size=8000)
    chars = sum(map(len, held))

    def cpt(tok):
        return chars / sum(len(x) for x in tok(held, add_special_tokens=False)["input_ids"])

    assert cpt(capped) > 0.99 * cpt(exact)
    for line in held[:50]:
        ids = capped(line)["input_ids"]
        assert UNK_ID not in ids and capped.decode(ids, skip_special_tokens=True) == line


def test_char_vocab_holds_its_size_when_the_text_has_more_characters_than_ids():
    """More distinct characters than ids: the most frequent become tokens, the rare ones byte fallback."""
    rng = random.Random(3)
    common = [chr(0x4E00 + i) for i in range(300)]
    rare = [chr(0x5E00 + i) for i in range(1500)]  # each seen once or twice
    lines = ["".join(rng.choice(common) for _ in range(30)) + rng.choice(rare) for _ in range(3000)]
    tok = train_tokenizer(lines, vocab_size=1024, token_type="char")
    assert len(tok) == 1024
    vocab = tok.get_vocab()
    assert all(c in vocab for c in common)  # frequent characters are single tokens
    assert sum(c in vocab for c in rare) < 300  # most rare ones are not
    for text in lines[:50] + ["".join(rare[:20])]:
        ids = tok(text)["input_ids"]
        assert UNK_ID not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
