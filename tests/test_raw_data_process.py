"""The data stage end to end: config -> cleaned, deduplicated parquet + report, on fixtures written here; the
reference's named sources in their schemas; bad input accounting; the demo config; the shipped config on
../shared/data (fails under CI=true when it is missing)."""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from utils.raw_data_process import DROP_REASONS, PRESETS, _chunk, load_config, run_pipeline
from utils.readers import SourceFileError

ROOT = Path(__file__).resolve().parents[1]


def _require_shared(sub: str = "") -> Path:
    try:
        from helpers import require_shared_data  # the project's shared check (fails under CI=true)
        return require_shared_data(sub)
    except ImportError:  # pragma: no cover - conftest is always there in this repo
        p = ROOT.parent / "shared" / "data" / sub
        if not p.exists():
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{p} is missing: CI must provide ../shared/data")
            pytest.skip(f"{p} not available")
        return p


def _jsonl(path: Path, rows, raw_lines=()):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line + "\n")


def _cfg(root: Path, sources: list, **kw) -> dict:
    cfg = {"data_root": str(root), "seed": 1, "progress": False, "shuffle_buckets": 2, "sources": sources}
    cfg.update(kw)
    return cfg


def _run(root, sources, out, **kw) -> dict:
    return run_pipeline(_cfg(root, sources, **kw), out)


def _adds_up(report: dict):
    for name, s in report["sources"].items():
        assert s["rows_read"] == s["kept"] + sum(s["dropped"][r] for r in DROP_REASONS), name
        assert s["adds_up"], name
    assert report["totals"]["adds_up"]


# ------------------------------------------------------------------ a small mixed corpus with every kind of bad input
@pytest.fixture()
def mixed(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    # prose, with an undecodable line and a truncated gzip
    (root / "prose.txt").write_bytes(
        "今天天气很好，我们一起去公园散步。然后去吃晚饭，吃完饭回家看书。\n".encode()
        + b"\xff\xfe\xfd broken line\n"
        + "學而時習之，不亦說乎？有朋自遠方來，不亦樂乎？\n".encode()
        + "短\n".encode()
        + "今天天气很好，我们一起去公园散步。然后去吃晚饭，吃完饭回家看书。\n".encode())
    full = gzip.compress("".join(f"第{i}行文本内容，用来测试截断的压缩文件。\n" for i in range(3000)).encode())
    (root / "cut.txt.gz").write_bytes(full[: len(full) // 2])
    # SFT JSON lines: missing field, invalid JSON, empty text, a 5 MB row, an exact and a near duplicate
    big = "长" * (5 * 1024 * 1024 // 3 + 10)
    _jsonl(root / "sft.jsonl", [
        {"instruction": "给出保持健康的三个建议。", "input": "", "output": "1. 均衡饮食。\n2. 定期锻炼。\n3. 充足睡眠。"},
        {"instruction": "圆周率是多少？", "input": "", "output": "圆周率约为3.14159，通常取3.14。"},
        {"instruction": "缺少输出字段"},
        {"instruction": "空回答", "input": "", "output": ""},
        {"instruction": "大行", "output": big},
        {"instruction": "给出保持健康的三个建议。", "input": "", "output": "1. 均衡饮食。\n2. 定期锻炼。\n3. 充足睡眠。"},
        {"instruction": "给出保持健康的三个建议！", "input": "", "output": "1. 均衡饮食。\n2. 定期锻炼。\n3. 充足睡眠。"},
        {"instruction": "Translate: I love NLP", "input": "", "output": "我爱自然语言处理, it is fun."},
    ], raw_lines=['{"instruction": "坏的JSON", "output": '])
    # GB18030 CSV declared as UTF-8 (wrong encoding) and a correct one
    (root / "gb.csv").write_bytes("title,ask,answer\n头痛,头痛怎么办？,多休息，多喝水。\n".encode("gb18030"))
    (root / "ok.csv").write_bytes("title,ask,answer\n头痛怎么办,最近总是头痛怎么办？,多休息，多喝水，必要时就医。\n"
                                  .encode("gb18030"))
    # conversations, DPO, IE
    _jsonl(root / "conv.jsonl", [{"conversations": [
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！有什么可以帮你？"},
        {"from": "human", "value": "讲个笑话"}, {"from": "gpt", "value": "从前有座山，山里有座庙。"}]}])
    _jsonl(root / "dpo.jsonl", [
        {"conversations": [{"from": "human", "value": "问题一"}], "chosen": "好的回答一", "rejected": "差的回答"},
        {"question": "问题二", "response_chosen": "好的回答二", "response_rejected": "差"},
        {"question": "问题三", "response_chosen": "一样", "response_rejected": "一样"}])
    _jsonl(root / "ie.json", [{"text": "《邪少兵王》是冰火未央写的网络小说",
                               "spo_list": [{"predicate": "作者", "object": {"@value": "冰火未央"}, "subject": "邪少兵王"}]}])
    sources = [
        {"name": "prose", "role": "pretrain", "reader": "lines", "path": ["prose.txt", "cut.txt.gz"], "pairs": "split"},
        {"name": "sft", "role": "sft", "reader": "jsonl", "path": "sft.jsonl", "prompt": ["instruction", "input?"],
         "response": "output"},
        {"name": "gb_wrong", "preset": "medical_dialogue", "path": "gb.csv", "encoding": "utf-8"},
        {"name": "gb_ok", "preset": "medical_dialogue", "path": "ok.csv", "response_min_chars": 2},
        {"name": "conv", "role": "sft", "reader": "jsonl", "path": "conv.jsonl", "conversations": "conversations",
         "multi_turn": "per_turn"},
        {"name": "dpo", "role": "dpo", "reader": "dpo", "path": "dpo.jsonl", "response_min_chars": 1},
        {"name": "ie", "role": "ie", "reader": "ie", "path": "ie.json"},
    ]
    return root, sources


def test_mixed_corpus_outputs_and_report(mixed, tmp_path):
    root, sources = mixed
    out = tmp_path / "out"
    rep = _run(root, sources, out, max_row_bytes=1 << 20)
    _adds_up(rep)
    for name in ("my_train_dataset.parquet", "my_valid_dataset.parquet", "my_test_dataset.parquet",
                 "my_text_dataset.parquet", "my_dpo_dataset.parquet", "my_ie_dataset.parquet", "my_corpus.txt",
                 "report.json", "samples.json", "raw_data_process.log"):
        assert (out / name).is_file(), name
    assert not (out / "_tmp").exists()
    s = rep["sources"]
    # every kind of bad input is counted under its reason, with the file:line
    assert s["prose"]["bad_row_detail"]["decode_error"] == 1
    assert any(x.startswith(str(root / "prose.txt") + ":2") for x in s["prose"]["first_locations"]["decode_error"])
    assert s["prose"]["bad_row_detail"]["truncated_gzip"] == 1
    assert "cut.txt.gz" in s["prose"]["first_locations"]["truncated_gzip"][0]
    assert s["prose"]["dropped"]["too_short"] == 1 and s["prose"]["dropped"]["exact_dup"] == 1
    d = s["sft"]["bad_row_detail"]
    assert d == {"missing_field": 1, "empty": 1, "too_large": 1, "invalid_json": 1}
    assert s["sft"]["first_locations"]["missing_field"][0].startswith(str(root / "sft.jsonl") + ":3")
    assert "output" in s["sft"]["first_locations"]["missing_field"][0]
    assert s["sft"]["first_locations"]["too_large"][0].startswith(str(root / "sft.jsonl") + ":5")
    assert s["sft"]["first_locations"]["invalid_json"][0].startswith(str(root / "sft.jsonl") + ":9")
    assert s["sft"]["dropped"]["exact_dup"] == 1 and s["sft"]["dropped"]["near_dup"] == 1
    assert s["gb_wrong"]["bad_row_detail"] == {"wrong_encoding": 1} and s["gb_wrong"]["kept"] == 0
    assert s["gb_ok"]["kept"] == 1
    assert s["conv"]["rows_read"] == 2 and s["conv"]["records_read"] == 1  # one row per assistant turn
    assert s["dpo"]["kept"] == 2 and s["dpo"]["dropped"]["filter"] == 1  # chosen == rejected
    assert rep["totals"]["bad_row_detail"]["truncated_gzip"] == 1
    log = (out / "raw_data_process.log").read_text(encoding="utf-8")
    assert "sft.jsonl:3" in log and "decode_error" in log
    # outputs
    pairs = pd.concat([pd.read_parquet(out / f"my_{k}_dataset.parquet") for k in ("train", "valid", "test")])
    assert list(pairs.columns) == ["prompt", "response"]
    assert "圆周率约为3.14159，通常取3.14。" in set(pairs.response)  # decimals intact
    assert "1. 均衡饮食。\n2. 定期锻炼。\n3. 充足睡眠。" in set(pairs.response)  # newlines intact
    assert "Translate: I love NLP" in set(pairs.prompt)  # English spaces intact
    assert "多休息，多喝水，必要时就医。" in set(pairs.response)
    assert "头痛怎么办\n最近总是头痛怎么办？" in set(pairs.prompt)  # the title+description rule
    assert "用户：你好\n助手：你好！有什么可以帮你？\n用户：讲个笑话" in set(pairs.prompt)
    text = pd.concat([pd.read_parquet(out / f) for f in
                      ("my_text_dataset.parquet", "my_valid_text.parquet", "my_test_text.parquet")])
    assert list(text.columns) == ["text", "title", "source"]
    assert "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？" in set(text.text)  # traditional -> simplified
    dpo = pd.read_parquet(out / "my_dpo_dataset.parquet")
    assert list(dpo.columns) == ["prompt", "chosen", "rejected"] and len(dpo) == 2
    ie = pd.read_parquet(out / "my_ie_dataset.parquet")
    assert json.loads(ie.triples[0]) == [["邪少兵王", "作者", "冰火未央"]]
    corpus = (out / "my_corpus.txt").read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in corpus)
    assert "均衡饮食。 2. 定期锻炼" in "\n".join(corpus)  # one document per line, inner newlines -> spaces
    assert not any("冰火未央写的网络小说" in line for line in corpus)  # IE stays out of the tokenizer corpus


def test_splits_are_seeded_and_follow_the_ratios(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    rows = [{"instruction": f"第{i}个问题：{i}乘以{i + 7}等于多少？", "output": f"{i}乘以{i + 7}等于{i * (i + 7)}。"}
            for i in range(1000)]
    _jsonl(root / "q.jsonl", rows)
    src = [{"name": "q", "role": "sft", "reader": "jsonl", "path": "q.jsonl", "prompt": "instruction",
            "response": "output", "near_dedup": False}]
    r1 = _run(root, src, tmp_path / "o1", splits={"train": 0.8, "valid": 0.1, "test": 0.1})
    r2 = _run(root, src, tmp_path / "o2", splits={"train": 0.8, "valid": 0.1, "test": 0.1})
    assert r1["outputs"] == r2["outputs"]
    a = pd.read_parquet(tmp_path / "o1" / "my_train_dataset.parquet")
    b = pd.read_parquet(tmp_path / "o2" / "my_train_dataset.parquet")
    assert a.equals(b)
    assert 700 < len(a) < 900 and r1["outputs"]["my_valid_dataset.parquet"] > 50
    assert a.prompt.tolist() != sorted(a.prompt.tolist(), key=lambda p: int(p[1:p.index("个")]))  # shuffled
    r3 = _run(root, src, tmp_path / "o3", seed=2, splits={"train": 0.8, "valid": 0.1, "test": 0.1})
    assert not pd.read_parquet(tmp_path / "o3" / "my_train_dataset.parquet").equals(a)


def test_held_out_rows_never_reach_the_training_text_or_the_corpus(tmp_path):
    """A prose row, the pair made from it and its corpus line share one split: held-out prose is neither
    pretraining text nor tokenizer text (so held-out bpc is measured on text never trained on)."""
    root = tmp_path / "raw"
    root.mkdir()
    lines = [f"第{i}篇文章讲的是第{i * 7 + 3}号观测站。它记录了{i % 13 + 2}年的气温和降水。" for i in range(600)]
    (root / "prose.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    qa = [{"instruction": f"问题{i}：{i}加{i + 5}等于几？", "output": f"{i}加{i + 5}等于{2 * i + 5}。"} for i in range(400)]
    _jsonl(root / "q.jsonl", qa)
    src = [{"name": "p", "role": "pretrain", "reader": "lines", "path": "prose.txt", "pairs": "split",
            "near_dedup": False},
           {"name": "q", "role": "sft", "reader": "jsonl", "path": "q.jsonl", "prompt": "instruction",
            "response": "output", "near_dedup": False}]
    out = tmp_path / "o"
    rep = _run(root, src, out, splits={"train": 0.8, "valid": 0.1, "test": 0.1})
    _adds_up(rep)
    train_text = set(pd.read_parquet(out / "my_text_dataset.parquet").text)
    held_text = set(pd.concat([pd.read_parquet(out / f"my_{k}_text.parquet") for k in ("valid", "test")]).text)
    assert held_text and train_text and not (train_text & held_text)
    assert len(train_text) + len(held_text) == 600  # every prose row is somewhere
    corpus = set((out / "my_corpus.txt").read_text(encoding="utf-8").splitlines())
    assert not (held_text & corpus) and train_text <= corpus
    held_pairs = pd.concat([pd.read_parquet(out / f"my_{k}_dataset.parquet") for k in ("valid", "test")])
    train_pairs = pd.read_parquet(out / "my_train_dataset.parquet")
    for p, r in zip(held_pairs.prompt, held_pairs.response):
        assert not any(t.startswith(p) for t in train_text)  # a pair made from prose: its prose is held out
        assert f"{p} {r}" not in corpus  # SFT pairs held out of the tokenizer text
    assert not (set(held_pairs.prompt) & set(train_pairs.prompt))


# ------------------------------------------------------------------ unreadable files and optional sources
def test_unreadable_file_names_it_unless_optional(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    (root / "junk.parquet").write_bytes(b"this is not parquet")
    src = [{"name": "z", "role": "sft", "reader": "parquet", "path": "junk.parquet"}]
    with pytest.raises(SourceFileError, match="junk.parquet"):
        _run(root, src, tmp_path / "o")
    rep = _run(root, [dict(src[0], optional=True)], tmp_path / "o2")
    assert "junk.parquet" in rep["sources"]["z"]["error"]
    with pytest.raises(SourceFileError, match="nothing_here"):
        _run(root, [{"name": "m", "role": "sft", "reader": "jsonl", "path": "nothing_here/*.jsonl"}], tmp_path / "o3")
    rep = _run(root, [{"name": "m", "role": "sft", "reader": "jsonl", "path": "nothing_here/*.jsonl",
                       "optional": True}], tmp_path / "o4")
    assert rep["sources"]["m"]["rows_read"] == 0 and rep["sources"]["m"]["error"]


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="role"):
        load_config({"sources": [{"name": "a", "role": "nope", "reader": "lines", "path": "x"}]})
    with pytest.raises(ValueError, match="unknown reader"):
        load_config({"sources": [{"name": "a", "role": "sft", "reader": "nope", "path": "x"}]})
    with pytest.raises(ValueError, match="unknown preset"):
        load_config({"sources": [{"name": "a", "preset": "nope", "path": "x"}]})
    with pytest.raises(ValueError, match="sum to 1"):
        load_config({"splits": {"train": 0.5, "test": 0.1}, "sources": []})


# ------------------------------------------------------------------ the reference's named sources, in their schemas
def test_reference_named_sources(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    _jsonl(root / "web_text_zh_train.json", [
        {"qid": "1", "title": "如何学好数学", "desc": "", "topic": "数学", "star": 12,
         "content": "多做题，多思考，<br>整理错题本。", "answer_id": "a", "answerer_tags": ""},
        {"qid": "2", "title": "低赞回答", "desc": "", "topic": "x", "star": 1, "content": "这个回答点赞太少会被过滤掉。",
         "answer_id": "b", "answerer_tags": ""}])
    _jsonl(root / "baike_qa_train.json", [
        {"qid": "q1", "category": "健康", "title": "感冒了怎么办", "desc": "最近感冒了，鼻塞流涕，怎么办",
         "answer": "多喝热水，注意休息，症状严重时请及时就医。"},
        {"qid": "q2", "category": "健康", "title": "失眠怎么办", "desc": "失眠怎么办", "answer": "睡前不要玩手机，保持规律作息。"}])
    (root / "medical").mkdir()
    (root / "medical" / "IM.csv").write_bytes(
        "department,title,ask,answer\n心血管科,高血压患者能吃党参吗？,我有高血压，能喝党参泡水吗？,高血压病人可以口服党参，党参有降血压的作用。\n"
        .encode("gb18030"))
    pd.DataFrame({"INSTRUCTION": ["为什么天空是蓝色的？"], "RESPONSE": ["因为瑞利散射使蓝光更容易被散射。"],
                  "SOURCE": ["zhihu"], "METADATA": ["{}"]}).to_parquet(root / "zhihu.parquet")
    _jsonl(root / "Belle_open_source_1M.json", [{"instruction": "写一句关于春天的诗。", "input": "",
                                                 "output": "春风又绿江南岸，明月何时照我还。"}])
    (root / "wiki").mkdir()
    (root / "wiki" / "wiki_00").write_text(
        '<doc id="1" url="u" title="数学">\n数学\n\n数学是利用符号语言研究数量、结构、变化以及空间等概念的一门学科。\n</doc>\n',
        encoding="utf-8")
    (root / "alpaca_gpt4_data_zh.json").write_text(json.dumps([
        {"instruction": "给出三个保持健康的建议。", "input": "", "output": "1. 均衡饮食。\n2. 经常锻炼。\n3. 睡眠充足。"},
        {"instruction": "翻译成英文", "input": "你好", "output": "Hello."}], ensure_ascii=False), encoding="utf-8")
    sources = [
        {"name": "webtext", "preset": "webtext2019zh", "path": "web_text_zh_*.json"},
        {"name": "baike", "preset": "baike_qa2019", "path": "baike_qa_*.json"},
        {"name": "medical", "preset": "medical_dialogue", "path": "medical/*.csv"},
        {"name": "zhihu", "preset": "zhihu_kol", "path": "*.parquet"},
        {"name": "belle", "preset": "belle", "path": "Belle_*.json", "response_min_chars": 5},
        {"name": "zhwiki", "preset": "zhwiki", "path": "wiki/wiki_*"},
        {"name": "alpaca", "preset": "alpaca_gpt4_zh", "path": "alpaca_gpt4_data_zh.json"},
    ]
    out = tmp_path / "out"
    rep = _run(root, sources, out, splits={"train": 1.0, "valid": 0.0, "test": 0.0})
    _adds_up(rep)
    s = rep["sources"]
    assert s["webtext"]["kept"] == 1 and s["webtext"]["dropped"]["filter"] == 1  # star < 5
    pairs = pd.read_parquet(out / "my_train_dataset.parquet")
    got = dict(zip(pairs.prompt, pairs.response))
    assert got["如何学好数学"] == "多做题，多思考，\n整理错题本。"  # HTML <br> -> newline
    assert got["感冒了怎么办\n最近感冒了，鼻塞流涕，怎么办"] == "多喝热水，注意休息，症状严重时请及时就医。"
    assert got["失眠怎么办"] == "睡前不要玩手机，保持规律作息。"  # near-identical title/desc: title only
    assert got["高血压患者能吃党参吗？我有高血压，能喝党参泡水吗？"] == "高血压病人可以口服党参，党参有降血压的作用。"
    assert got["为什么天空是蓝色的？"] == "因为瑞利散射使蓝光更容易被散射。"
    assert got["写一句关于春天的诗。"] == "春风又绿江南岸，明月何时照我还。"
    assert got["给出三个保持健康的建议。"] == "1. 均衡饮食。\n2. 经常锻炼。\n3. 睡眠充足。"
    assert got["翻译成英文\n你好"] == "Hello."
    wiki_prompts = [p for p, r in got.items() if r.startswith("数学是利用符号语言")]
    assert len(wiki_prompts) == 1 and "数学" in wiki_prompts[0] and wiki_prompts[0] != "数学"  # a question template
    text = pd.concat([pd.read_parquet(out / f) for f in
                      ("my_text_dataset.parquet", "my_valid_text.parquet", "my_test_text.parquet")])
    assert text.title.tolist() == ["数学"]
    assert set(PRESETS) >= {"webtext2019zh", "baike_qa2019", "medical_dialogue", "zhihu_kol", "belle", "zhwiki",
                            "alpaca_gpt4_zh"}


def test_long_prose_is_cut_not_lost():
    text = "第一段很长。" * 300 + "\n第二段。\n" + "逗号，" * 500
    chunks = _chunk(text, 1000)
    assert all(len(c) <= 1000 for c in chunks)
    assert "".join(chunks).replace("\n", "") == text.replace("\n", "")


# ------------------------------------------------------------------ the demo config and the command line
def _demo_files(d: Path):
    d.mkdir(parents=True, exist_ok=True)
    (d / "corpus.txt").write_text("15千克等于15000克。\n下雨了，街上的行人撑起了五颜六色的雨伞。月亮本身不发光，它反射的是太阳的光。\n"
                                  "今天是星期六，明天是星期日。\n", encoding="utf-8")
    pd.DataFrame({"prompt": ["23米等于多少厘米？", "你好"], "response": ["23米等于2300厘米。", "你好！我是一个小型中文对话模型。"]}
                 ).to_parquet(d / "sft.parquet")


def test_demo_config_on_a_fixture(tmp_path):
    _demo_files(tmp_path / "demo")
    rep = run_pipeline(ROOT / "data/sources/demo.yaml", tmp_path / "out", data_root=str(tmp_path / "demo"),
                       progress=False)
    _adds_up(rep)
    assert rep["sources"]["demo_corpus"]["kept"] == 3 and rep["sources"]["demo_sft"]["kept"] == 2
    assert rep["sources"]["demo_dpo"]["error"]  # optional and absent here
    n = sum(rep["outputs"][f"my_{k}_dataset.parquet"] for k in ("train", "valid", "test"))
    assert n == 2 + rep["totals"]["pairs_from_prose"] and rep["totals"]["pairs_from_prose"] >= 1


@pytest.mark.parametrize("how", ["module", "script"])
def test_command_line(tmp_path, how):
    _demo_files(tmp_path / "demo")
    cmd = ([sys.executable, "-m", "utils.raw_data_process"] if how == "module"
           else [sys.executable, "utils/raw_data_process.py"])
    cmd += ["--config", "data/sources/demo.yaml", "--output_dir", str(tmp_path / "out"), "--data_root",
            str(tmp_path / "demo"), "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert rep["totals"]["adds_up"] and rep["totals"]["kept"] == 5


# ------------------------------------------------------------------ the shipped config over ../shared/data
def test_shipped_config_matches_files_in_shared_data():
    root = _require_shared()
    cfg = load_config(ROOT / "data/sources/shared_all.yaml")
    from utils.raw_data_process import _resolve_files
    for src in cfg["sources"]:
        assert _resolve_files(src, root), f"{src['name']}: no file matches {src['path']}"
    roles = {s["role"] for s in cfg["sources"]}
    assert roles == {"pretrain", "sft", "dpo", "ie"}


def test_shipped_config_on_shared_data_with_a_row_cap(tmp_path):
    _require_shared("pretrain")
    rep = run_pipeline(ROOT / "data/sources/shared_all.yaml", tmp_path / "all", max_rows_per_source=40,
                       progress=False, data_root=str(ROOT.parent / "shared" / "data"))
    _adds_up(rep)
    for name, s in rep["sources"].items():
        assert s["rows_read"] > 0 and s["kept"] > 0 or name == "medical_dialogue_txt", name
        assert s["error"] is None, name
    assert rep["outputs"]["my_train_dataset.parquet"] > 300
    assert rep["outputs"]["my_dpo_dataset.parquet"] > 0 and rep["outputs"]["my_ie_dataset.parquet"] > 0


def test_every_data_stage_setting_is_a_documented_flag():
    """The data stage's settings live in config.py: each one, nested ones dotted, is listed with its help."""
    from config import DataStageConfig, data_stage_defaults, data_stage_help
    from utils.raw_data_process import DEFAULTS
    assert DEFAULTS == data_stage_defaults() and set(DEFAULTS) == {f.name for f in dataclasses.fields(DataStageConfig)}
    lines = [line for line in data_stage_help().splitlines() if line.startswith("  --")]
    flat = {k for k, v in DEFAULTS.items() if not isinstance(v, dict) or k == "splits"}
    nested = {f"{k}.{n}" for k, v in DEFAULTS.items() if isinstance(v, dict) and k != "splits" for n in v}
    listed = {line.split()[0][2:] for line in lines}
    assert flat | nested <= listed
    for line in lines:  # name, type, "default", the value, then the help text
        assert re.search(r"default .+  \S", line), line
