"""Readers for every raw format, on small fixtures written here; bad input is reported with its location."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pandas as pd
import pytest

from model.data.sources import normalize_turns
from model.prompt import join_history
from utils.readers import (Bad, Rec, SourceFileError, _JsonArrayStream, conversation_to_pairs, iter_dpo_records,
                           read_blocks, read_csv, read_dpo, read_fortune, read_html,
                           read_ie, read_json, read_json_walk, read_jsonl, read_lines, read_manpage, read_parquet,
                           read_squad, read_tagged, read_wikiextractor, sniff_encoding)


def recs(it):
    out = list(it)
    return [r for r in out if isinstance(r, Rec)], [r for r in out if isinstance(r, Bad)]


def write(p: Path, data, encoding="utf-8") -> str:
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        p.write_bytes(data)
    else:
        p.write_text(data, encoding=encoding)
    return str(p)


# ------------------------------------------------------------------ plain text formats
def test_lines_with_label_column_and_blank_lines(tmp_path):
    p = write(tmp_path / "r.txt", "1\t好书，值得一读\n\n0\t这么差\t的书\nlonely\n")
    good, bad = recs(read_lines(p, columns=["label", "text"]))
    assert [g.fields for g in good] == [{"label": "1", "text": "好书，值得一读"}, {"label": "0", "text": "这么差\t的书"}]
    assert good[1].loc.endswith("r.txt:3")
    assert [(b.reason, b.loc.split(":")[-1]) for b in bad] == [("missing_field", "4")]


def test_undecodable_line_is_reported_with_its_line(tmp_path):
    p = write(tmp_path / "x.txt", "第一行\n".encode() + b"\xff\xfe bad\n" + "第三行\n".encode())
    good, bad = recs(read_lines(p))
    assert [g.fields["text"] for g in good] == ["第一行", "第三行"]
    assert bad[0].reason == "decode_error" and bad[0].loc.endswith("x.txt:2")


def test_wrong_encoding_is_reported(tmp_path):
    p = write(tmp_path / "gb.txt", "中文第一行\n中文第二行\nascii only\n", encoding="gb18030")
    good, bad = recs(read_lines(p, encoding="utf-8"))
    assert [b.reason for b in bad] == ["wrong_encoding", "wrong_encoding"]
    assert "gb18030" in bad[0].detail
    assert [g.fields["text"] for g in good] == ["ascii only"]
    good, bad = recs(read_lines(p, encoding="gb18030"))
    assert len(good) == 3 and not bad
    good, _ = recs(read_lines(p, encoding="auto"))
    assert good[0].fields["text"] == "中文第一行"
    assert sniff_encoding("中文".encode("gb18030")) == "gb18030"


def test_a_5mb_row_is_skipped_without_stopping_the_file(tmp_path):
    big = "长" * (5 * 1024 * 1024 // 3 + 10)
    p = write(tmp_path / "big.jsonl", json.dumps({"text": "a"}) + "\n" + json.dumps({"text": big}, ensure_ascii=False)
              + "\n" + json.dumps({"text": "c"}) + "\n")
    good, bad = recs(read_jsonl(p, max_row_bytes=1 << 20))
    assert [g.fields["text"] for g in good] == ["a", "c"]
    assert bad[0].reason == "too_large" and bad[0].loc.endswith("big.jsonl:2") and bad[0].chars > 5_000_000


def test_tagged_text(tmp_path):
    p = write(tmp_path / "pd.txt", "迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  ——/w  一九九八年/t\n"
                                   "[中国/ns 政府/n]nt  发表/v  Windows/nx  95/m  声明/n\n")
    good, _ = recs(read_tagged(p))
    assert good[0].fields["text"] == "迈向充满希望的新世纪——一九九八年"
    assert good[1].fields["text"] == "中国政府发表Windows 95声明"


def test_blocks_medical_dialogue_txt(tmp_path):
    text = "高血压能吃党参吗？,我有高血压，可以吃党参吗？\n可以口服党参。\n\n\n哪家医院能治胃反流,烧心，打隔\n 建议用奥美拉唑\n\n"
    p = write(tmp_path / "IM.txt", text, encoding="gb18030")
    good, bad = recs(read_blocks(p, encoding="gb18030", header_fields=["title", "ask"], body_field="answer"))
    assert not bad
    assert good[0].fields == {"title": "高血压能吃党参吗？", "ask": "我有高血压，可以吃党参吗？", "answer": "可以口服党参。"}
    assert good[1].loc.endswith("IM.txt:5")


def test_fortune_file_with_ansi_titles(tmp_path):
    text = ("\x1b[32m《春晓》\x1b[m\n\x1b[33m作者：孟浩然\x1b[m\n春眠不觉晓，处处闻啼鸟。\n%\n"
            "人看从小，马看踢蹄。\n--《谚语》\n%\n")
    p = write(tmp_path / "tang300", text)
    good, _ = recs(read_fortune(p))
    assert good[0].fields["title"] == "《春晓》\n作者：孟浩然"
    assert good[0].fields["text"] == "春眠不觉晓，处处闻啼鸟。"
    assert good[1].fields["title"] == "" and good[1].loc.endswith("tang300:5")


# ------------------------------------------------------------------ JSON formats
def test_jsonl_invalid_and_non_object_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"a": 1}\n{"a": \n[1, 2]\n\n{"a": 3}\n')
    good, bad = recs(read_jsonl(p))
    assert [g.fields["a"] for g in good] == [1, 3]
    assert [(b.reason, b.loc.split(":")[-1]) for b in bad] == [("invalid_json", "2"), ("invalid_json", "3")]


def test_json_array_is_streamed_across_buffer_edges(tmp_path):
    items = [{"instruction": f"问题{i}", "output": "答" * (i % 7) + str(i), "n": i * 1.5} for i in range(200)]
    p = write(tmp_path / "a.json", json.dumps(items, ensure_ascii=False, indent=2))
    out = list(_JsonArrayStream(p, "utf-8", max_row_bytes=1 << 20, chunk=37))
    assert [r.fields for r in out] == items
    assert out[1].loc.endswith(":7")  # the line where the second element starts


def test_json_array_bad_and_oversized_elements(tmp_path):
    big = "x" * 5000
    text = '[{"a": 1},\n{"a": "' + big + '"},\n{"a" 2},\n{"a": 4}]'
    p = write(tmp_path / "b.json", text)
    out = list(_JsonArrayStream(p, "utf-8", max_row_bytes=1000, chunk=64))
    kinds = [(type(r).__name__, getattr(r, "reason", None)) for r in out]
    assert kinds == [("Rec", None), ("Bad", "too_large"), ("Bad", "invalid_json"), ("Rec", None)]
    assert out[2].loc.endswith(":3") and out[3].fields == {"a": 4}


def test_json_file_that_is_really_json_lines(tmp_path):
    p = write(tmp_path / "dev1K.json", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    good, _ = recs(read_json(p))
    assert [g.fields["instruction"] for g in good] == ["a", "c"]


def test_json_walk_nested_poetry(tmp_path):
    obj = {"title": "唐詩三百首", "content": [{"type": "五言絕句", "content": [
        {"chapter": "相思", "author": "王維", "paragraphs": ["紅豆生南國，春來發幾枝。", "願君多采擷，此物最相思。"]}]}]}
    p1 = write(tmp_path / "t.json", json.dumps(obj, ensure_ascii=False))
    p2 = write(tmp_path / "ci.json", json.dumps([{"author": "李煜", "rhythmic": "浣溪沙", "paragraphs": ["红日已高三丈透"]},
                                                 {"content": "读经宜冬", "comment": ["x"]}], ensure_ascii=False))
    good, _ = recs(read_json_walk(p1))
    assert good[0].fields["title"] == "相思" and good[0].fields["author"] == "王維"
    assert good[0].fields["text"] == "紅豆生南國，春來發幾枝。\n願君多采擷，此物最相思。"
    assert good[0].fields["collection"] == "五言絕句" or good[0].fields["collection"] == "唐詩三百首"
    good, _ = recs(read_json_walk(p2))
    assert [g.fields["text"] for g in good] == ["红日已高三丈透", "读经宜冬"]
    assert good[0].fields["title"] == "浣溪沙"


def test_squad(tmp_path):
    obj = {"version": "v1.0", "data": [{"title": "大莱龙铁路", "paragraphs": [{"id": "D_0", "context": "大莱龙铁路位于山东。",
           "qas": [{"question": "位于哪里？", "answers": [{"text": "山东", "answer_start": 6}]}]}]}]}
    p = write(tmp_path / "cmrc.json", json.dumps(obj, ensure_ascii=False))
    good, _ = recs(read_squad(p))
    assert good[0].fields["title"] == "大莱龙铁路" and good[0].fields["context"] == "大莱龙铁路位于山东。"
    assert good[0].fields["questions"] == ["位于哪里？"] and good[0].fields["answers"] == ["山东"]


def test_invalid_json_file_names_the_file(tmp_path):
    p = write(tmp_path / "broken.json", '{"data": [1, 2')
    with pytest.raises(SourceFileError, match="broken.json"):
        list(read_json(p, records="data[]"))


# ------------------------------------------------------------------ CSV, parquet
def test_csv_gb18030_quoted_multiline(tmp_path):
    text = 'department,title,ask,answer\n心血管科,高血压能吃党参吗？,"我有高血压,\n能吃吗？",可以。\n内科,标题,问,答\n'
    p = write(tmp_path / "m.csv", text, encoding="gb18030")
    good, bad = recs(read_csv(p, encoding="gb18030"))
    assert not bad
    assert good[0].fields["ask"] == "我有高血压,\n能吃吗？" and good[0].loc.endswith("m.csv:2")
    assert good[1].loc.endswith("m.csv:4")


def test_csv_bad_rows(tmp_path):
    raw = ("a,b,c\n1,2,3\n4,5\n".encode() + b"6,\xff\xfe,7\n" + "8,9,10,11\n12,13,14\n".encode())
    p = write(tmp_path / "bad.csv", raw)
    good, bad = recs(read_csv(p))
    assert [g.fields["a"] for g in good] == ["1", "12"]
    assert [(b.reason, b.loc.split(":")[-1]) for b in bad] == [("missing_field", "3"), ("decode_error", "4"),
                                                               ("bad_csv", "5")]


def test_csv_declared_utf8_but_gb18030(tmp_path):
    p = write(tmp_path / "gb.csv", "t,a\n标题,答案\n标题二,答案二\n", encoding="gb18030")
    good, bad = recs(read_csv(p, encoding="utf-8"))
    assert not good and [b.reason for b in bad] == ["wrong_encoding", "wrong_encoding"]


def test_parquet_and_unreadable_parquet(tmp_path):
    p = tmp_path / "z.parquet"
    pd.DataFrame({"INSTRUCTION": ["问", "问2"], "RESPONSE": ["答", "答2"]}).to_parquet(p)
    good, _ = recs(read_parquet(str(p)))
    assert good[1].fields == {"INSTRUCTION": "问2", "RESPONSE": "答2"} and good[1].loc.endswith("row 2")
    junk = write(tmp_path / "junk.parquet", b"not a parquet file at all")
    with pytest.raises(SourceFileError, match="junk.parquet"):
        list(read_parquet(junk))
    with pytest.raises(SourceFileError, match="no column"):
        list(read_parquet(str(p), columns=["prompt"]))


# ------------------------------------------------------------------ man pages, HTML, wikiextractor
MAN = ".TH LS 1 2022\n.SH 名称\nls \\- 列出目录内容\n.SH 描述\n列出\\fB文件\\fP的信息。\n"


def test_manpage_gzip_alias_and_truncated(tmp_path):
    d = tmp_path / "man1"
    d.mkdir()
    (d / "ls.1.gz").write_bytes(gzip.compress(MAN.encode()))
    (d / "dir.1.gz").write_bytes(b"ls.1.gz")
    full = gzip.compress((MAN * 50).encode())
    (d / "cut.1.gz").write_bytes(full[: len(full) // 2])
    good, _ = recs(read_manpage(str(d / "ls.1.gz")))
    assert good[0].fields["name"] == "ls(1)" and good[0].fields["title"] == "ls - 列出目录内容"
    assert "列出文件的信息。" in good[0].fields["text"] and "\\f" not in good[0].fields["text"]
    _, bad = recs(read_manpage(str(d / "dir.1.gz")))
    assert bad[0].reason == "man_page_alias" and bad[0].category == "exact_dup"
    _, bad = recs(read_manpage(str(d / "cut.1.gz")))
    assert bad[0].reason == "truncated_gzip" and "cut.1.gz" in bad[0].loc


def test_truncated_gzip_lines(tmp_path):
    data = gzip.compress("".join(f"第{i}行\n" for i in range(2000)).encode())
    p = write(tmp_path / "t.txt.gz", data[: len(data) * 2 // 3])
    good, bad = recs(read_lines(p))
    assert 0 < len(good) < 2000
    assert bad[-1].reason == "truncated_gzip" and "t.txt.gz" in bad[-1].loc


def test_html_sections_without_navigation(tmp_path):
    html = """<html><head><title>T</title><script>var a=1;</script></head><body>
    <div class="navheader"><a href="x">上一页</a></div>
    <h1>第 1 章 教程</h1><p>第一段&amp;说明。</p>
    <h2>1.1 表格</h2><table><tr><th>包</th><th>说明</th></tr><tr><td>fdisk</td><td>分区</td></tr></table>
    <pre class="screen">$ ls -l
total 0</pre><div class="navfooter">下一页</div></body></html>"""
    p = write(tmp_path / "ch01.html", html)
    good, _ = recs(read_html(p))
    assert [g.fields["title"] for g in good] == ["第 1 章 教程", "1.1 表格"]
    assert good[0].fields["text"] == "第一段&说明。"
    assert good[1].fields["text"] == "包 | 说明\nfdisk | 分区\n$ ls -l\ntotal 0"
    assert all("上一页" not in g.fields["text"] and "下一页" not in g.fields["text"] for g in good)


def test_wikiextractor_doc_and_json(tmp_path):
    text = ('<doc id="13" url="https://zh.wikipedia.org/wiki?curid=13" title="数学">\n数学\n\n数学是研究数量的学科。\n'
            '它是一门学问。\n</doc>\n<doc id="18" url="u" title="哲学">\n哲学\n哲学是研究普遍问题的学科。\n</doc>\n')
    p = write(tmp_path / "wiki_00", text)
    good, _ = recs(read_wikiextractor(p))
    assert good[0].fields == {"title": "数学", "text": "数学是研究数量的学科。\n它是一门学问。"}
    assert good[1].loc.endswith("wiki_00:7")
    p2 = write(tmp_path / "wiki_01", json.dumps({"id": "1", "url": "u", "title": "物理", "text": "物理学。"},
                                                ensure_ascii=False) + "\n")
    good, _ = recs(read_wikiextractor(p2))
    assert good[0].fields["title"] == "物理" and good[0].fields["text"] == "物理学。"


# ------------------------------------------------------------------ IE, conversations, DPO
def test_ie_formats(tmp_path):
    duie = {"text": "《邪少兵王》是冰火未央写的网络小说", "spo_list": [{"predicate": "作者", "object_type": {"@value": "人物"},
            "subject_type": "图书作品", "object": {"@value": "冰火未央"}, "subject": "邪少兵王"}]}
    ske = {"text": "周星驰主演喜剧之王", "spo_list": [{"predicate": "主演", "object": "周星驰", "subject": "喜剧之王"}]}
    p = write(tmp_path / "ie.json", "\n".join([json.dumps(duie, ensure_ascii=False), json.dumps(ske, ensure_ascii=False),
                                               '文本一 || [["a", "b", "c"]]', '{"spo_list": []}']) + "\n")
    good, bad = recs(read_ie(p))
    assert good[0].fields["triples"] == [["邪少兵王", "作者", "冰火未央"]]
    assert good[1].fields["triples"] == [["喜剧之王", "主演", "周星驰"]]
    assert good[2].fields == {"text": "文本一", "triples": [["a", "b", "c"]]}
    assert bad[0].reason == "missing_field" and bad[0].loc.endswith("ie.json:4")


def test_conversation_pairs():
    conv = [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
            {"from": "human", "value": "1+1=?"}, {"from": "gpt", "value": "2"}]
    turns = normalize_turns(conv)
    assert conversation_to_pairs(turns, "last") == [("用户：你好\n助手：你好！\n用户：1+1=?", "2")]
    assert conversation_to_pairs(turns, "per_turn") == [("你好", "你好！"), ("用户：你好\n助手：你好！\n用户：1+1=?", "2")]
    assert join_history([], "问题") == "问题"
    assert normalize_turns([{"role": "user", "content": "q"}]) == [("user", "q")]


def test_dpo_all_schemas(tmp_path):
    recs_ = [
        {"conversations": [{"from": "human", "value": "问1"}], "chosen": {"from": "gpt", "value": "好1"},
         "rejected": {"from": "gpt", "value": "差1"}},
        {"conversations": [{"from": "human", "value": "问2"}], "chosen": "好2", "rejected": "差2"},
        {"system": "", "history": [["早", "早上好"]], "question": "问3", "response_chosen": "好3",
         "response_rejected": "差3"},
        {"instruction": "问4", "input": "补充", "output": ["好4", "差4"]},
        {"question": "问5"},
    ]
    p = write(tmp_path / "dpo.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in recs_) + "\n")
    got = list(iter_dpo_records(p))
    assert got == [{"prompt": "问1", "chosen": "好1", "rejected": "差1"},
                   {"prompt": "问2", "chosen": "好2", "rejected": "差2"},
                   {"prompt": "用户：早\n助手：早上好\n用户：问3", "chosen": "好3", "rejected": "差3"},
                   {"prompt": "问4\n补充", "chosen": "好4", "rejected": "差4"}]
    _, bad = recs(read_dpo(p))
    assert bad[0].reason == "missing_field" and bad[0].loc.endswith("dpo.jsonl:5")
    p2 = write(tmp_path / "dpo.json", json.dumps(recs_[:2], ensure_ascii=False))
    assert [r["prompt"] for r in iter_dpo_records(p2)] == ["问1", "问2"]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(SourceFileError, match="nope.txt"):
        list(read_lines(str(tmp_path / "nope.txt")))


def test_one_role_set_for_every_conversation_format():
    conv = [{"from": "prompter", "value": "问"}, {"role": "answer", "content": "答"}, {"role": "tool", "content": 3},
            {"from": "system", "value": "系统"}, {"content": "无角色"}]
    assert normalize_turns(conv) == [("user", "问"), ("assistant", "答"), ("user", "3"), ("system", "系统"),
                                     ("user", "无角色")]
    with pytest.raises(ValueError, match="a list of turns"):
        normalize_turns(None)
