"""Triple extraction: data conversion (DuIE 2.0, SKE), robust output parsing, micro P/R/F1, fine-tune wiring."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from finetune_examples.info_extract.data_process import (PROMPT_PREFIX, ReadStats, format_triples, process,
                                                         read_ie_file, to_frame)
from finetune_examples.info_extract.evaluate import micro_prf, parse_triples, score_texts
from helpers import require_shared_data


# --------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,expect", [
    ("[(周杰伦,歌手,晴天),(方文山,作词,晴天)]", {("周杰伦", "歌手", "晴天"), ("方文山", "作词", "晴天")}),
    # extra spaces and Chinese punctuation
    ("[ ( 周杰伦 ， 歌手 ，晴天 ) ]", {("周杰伦", "歌手", "晴天")}),
    ("【（李白，朝代，唐朝）；（李白、出生地、碎叶城）】", {("李白", "朝代", "唐朝"), ("李白", "出生地", "碎叶城")}),
    # quotes around the fields
    ("[('红楼梦', '作者', '曹雪芹')]", {("红楼梦", "作者", "曹雪芹")}),
    ("[(“红楼梦”,“作者”,“曹雪芹”)]", {("红楼梦", "作者", "曹雪芹")}),
    # missing list brackets, missing closing bracket at the end, lost ')' in the middle, doubled brackets
    ("(a,b,c),(d,e,f)", {("a", "b", "c"), ("d", "e", "f")}),
    ("[(a,b,c),(d,e,f", {("a", "b", "c"), ("d", "e", "f")}),
    ("[(a,b,c,(d,e,f)]", {("a", "b", "c"), ("d", "e", "f")}),
    ("[((a,b,c))]", {("a", "b", "c")}),
    # brackets inside an entity stay in the entity
    ("[(李白,出生地,碎叶城(今托克马克))]", {("李白", "出生地", "碎叶城(今托克马克)")}),
    # too few fields, empty, garbage: nothing, never an error
    ("[(a,b)]", set()),
    ("[(a,b),(c,d,e)]", {("c", "d", "e")}),
    ("", set()),
    ("[]", set()),
    ("))((", set()),
    # the same triple twice counts once; full-width letters are folded
    ("[(ＡＢ,作者,c),(AB,作者,c)]", {("ab", "作者", "c")}),
])
def test_parse_triples(text, expect):
    assert parse_triples(text) == expect


def test_entity_with_comma_split_by_known_predicate():
    ref = format_triples([("你好，旧时光", "主演", "李兰迪"), ("你好，旧时光", "导演", "刘娟")])
    other = format_triples([("甲", "主演", "乙")])
    s = score_texts([ref, other], [ref, other])
    assert s["f1"] == 1.0 and s["n_gold"] == 3
    assert ("你好,旧时光", "主演", "李兰迪") in parse_triples(ref, {"主演", "导演"})
    # a prediction that splits the title wrongly is not a hit
    wrong = "[(你好,旧时光主演,李兰迪)]"
    assert score_texts([wrong], [ref])["tp"] == 0


# --------------------------------------------------------------------------------------- scoring
def test_micro_prf_hand_computed():
    preds = [{("a", "p", "b"), ("x", "p", "y")}, {("c", "p", "d")}, set()]
    golds = [{("a", "p", "b")}, {("c", "p", "d"), ("e", "p", "f")}, {("g", "p", "h")}]
    m = micro_prf(preds, golds)
    # TP = 1 + 1 + 0 = 2; predicted 3; gold 4
    assert (m["tp"], m["n_pred"], m["n_gold"]) == (2, 3, 4)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_micro_prf_edges():
    assert micro_prf([set()], [set()]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_pred": 0,
                                          "n_gold": 0}
    m = micro_prf([set()], [{("a", "b", "c")}])
    assert m["recall"] == 0.0 and m["f1"] == 0.0
    with pytest.raises(ValueError):
        micro_prf([set()], [set(), set()])


def test_score_texts_messy_predictions():
    refs = ["[(周杰伦,歌手,晴天),(方文山,作词,晴天)]", "[(李白,朝代,唐朝)]", "[(马云,创始人,阿里巴巴)]"]
    preds = ["[（周杰伦， 歌手，晴天）", "李白,朝代,唐朝", "我不知道"]
    s = score_texts(preds, refs)
    assert (s["tp"], s["n_pred"], s["n_gold"]) == (2, 2, 4)
    assert s["precision"] == 1.0 and s["recall"] == 0.5
    assert s["unparsed"] == 1 and s["exact_match"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------- conversion
def _lines(path: Path, rows: list):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")


def test_read_duie2_ske_and_bad_rows(tmp_path):
    p = tmp_path / "mixed.json"
    _lines(p, [
        # DuIE 2.0: object is a dict; the complex slot (inWork) is dropped; the duplicate triple removed
        {"text": "《晴天》由周杰伦演唱", "spo_list": [
            {"subject": "晴天", "predicate": "歌手", "object": {"@value": "周杰伦"}, "object_type": {"@value": "人物"}},
            {"subject": "晴天", "predicate": "歌手", "object": {"@value": "周杰伦"}},
            {"subject": "周杰伦", "predicate": "饰演", "object": {"@value": "叶湘伦", "inWork": "不能说的秘密"}}]},
        # SKE / DuIE 1.0: object is a string, postag present
        {"postag": [{"word": "李白", "pos": "nr"}], "text": " 李白是唐朝诗人 ",
         "spo_list": [{"subject": "李白", "predicate": "朝代", "object": "唐朝", "object_type": "朝代"}]},
        "马云创立了阿里巴巴 || [{\"subject\": \"阿里巴巴\", \"predicate\": \"创始人\", \"object\": \"马云\"}]",
        "{not json",
        {"spo_list": []},
        {"text": "没有三元组", "spo_list": []},
        {"text": "坏的三元组", "spo_list": [{"subject": "", "predicate": "p", "object": "o"}, "x"]},
        {"text": "字段错误", "spo_list": "nope"},
    ])
    stats = ReadStats()
    rows = list(read_ie_file(p, stats))
    assert [t for t, _ in rows] == ["《晴天》由周杰伦演唱", "李白是唐朝诗人", "马云创立了阿里巴巴"]
    assert rows[0][1] == [("晴天", "歌手", "周杰伦"), ("周杰伦", "饰演", "叶湘伦")]
    assert rows[1][1] == [("李白", "朝代", "唐朝")]
    assert stats.rows == 8 and stats.kept == 3 and stats.duplicate_triples == 1 and stats.bad_triples == 2
    assert sum(stats.skipped.values()) == 5 and stats.skipped["no valid triple"] == 2
    assert any(":4:" in e for e in stats.first_errors)  # the unreadable line is named by file and line
    df = to_frame(p)
    assert list(df.columns) == ["prompt", "response"] and len(df) == 3
    assert df.prompt[0] == PROMPT_PREFIX + "《晴天》由周杰伦演唱"
    assert df.response[0] == "[(晴天,歌手,周杰伦),(周杰伦,饰演,叶湘伦)]"
    # keep_empty keeps sentences without triples as "[]"
    assert "[]" in set(to_frame(p, keep_empty=True).response)


def test_json_array_and_token_filter(tmp_path, tiny_tokenizer):
    p = tmp_path / "arr.json"
    recs = [{"text": "短句", "spo_list": [{"subject": "a", "predicate": "b", "object": "c"}]},
            {"text": "长" * 300, "spo_list": [{"subject": "a", "predicate": "b", "object": "c"}]}]
    p.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    assert len(to_frame(p)) == 2
    stats = ReadStats()
    df = to_frame(p, stats, tokenizer=tiny_tokenizer, max_source_len=64, max_target_len=64)
    assert len(df) == 1 and stats.kept == 1 and stats.skipped == {"prompt over 64 tokens": 1}


def test_process_writes_splits(tmp_path, demo_data):
    paths = process(str(demo_data["ie"]), str(demo_data["ie"]), str(tmp_path / "ie"), valid_size=200)
    train = pd.read_parquet(paths["train"])
    dev = pd.read_parquet(paths["dev"])
    assert "valid" not in paths  # 8 rows: nothing to spare for validation (at most a tenth)
    assert len(train) == len(dev) == 8
    assert all(r.startswith("[(") and r.endswith(")]") for r in train.response)
    # the reference's format round-trips through the parser
    assert score_texts(list(dev.response), list(dev.response))["f1"] == 1.0


# ------------------------------------------------------------------------------------ fine-tune
def test_finetune_through_project_trainer(tiny_model_dir, demo_data, tmp_path):
    from finetune_examples.info_extract.finetune import finetune
    res = finetune(train_file=str(demo_data["ie"]), dev_file=str(demo_data["ie"]), init_from=str(tiny_model_dir),
                   data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "ie"), valid_size=0, max_steps=3,
                   batch_size_per_gpu=4, max_new_tokens=8, num_threads=1, progress=False,
                   curve_points=3)
    assert res["train"]["steps"] == 3
    # dev F1 at each of the 3 evaluations (every update here); the last one scores the exported model's weights
    assert [s for s, _ in res["f1_curve"]] == [1, 2, 3] and all(0.0 <= f <= 1.0 for _, f in res["f1_curve"])
    assert res["f1_curve"][-1][1] == res["dev"]["f1"]
    assert (tmp_path / "ie" / "config.json").is_file() and (tmp_path / "ie" / "ie_scores.json").is_file()
    dev = res["dev"]
    assert dev["sentences"] == 8 and dev["n_gold"] == 11 and 0.0 <= dev["f1"] <= 1.0
    preds = [json.loads(x) for x in (tmp_path / "ie" / "ie_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(preds) == 8 and preds[0]["prompt"].startswith(PROMPT_PREFIX)


def test_finetune_from_scratch_trains_its_own_tokenizer(demo_data, tmp_path):
    from finetune_examples.info_extract.finetune import finetune
    res = finetune(train_file=str(demo_data["ie"]), dev_file=None, preset="tiny", data_dir=str(tmp_path / "d"),
                   output_dir=str(tmp_path / "ie"), valid_size=0, max_steps=2, batch_size_per_gpu=4,
                   num_threads=1, progress=False)
    assert res["train"]["steps"] == 2 and "dev" not in res
    assert (tmp_path / "ie_tokenizer" / "tokenizer.json").is_file()



def test_time_budget_sizes_the_run_from_the_probe(tiny_model_dir, demo_data, tmp_path):
    """The run gets (budget - time spent - the probe's overhead) / steady-state s per step updates, and the
    probe leaves nothing behind."""
    from finetune_examples.info_extract.finetune import finetune
    res = finetune(train_file=str(demo_data["ie"]), dev_file=None, init_from=str(tiny_model_dir),
                   data_dir=str(tmp_path / "data"), output_dir=str(tmp_path / "ie"), valid_size=0,
                   time_budget_min=0.5, probe_steps=6, batch_size_per_gpu=4, num_threads=1, progress=False)
    budget = res["time_budget"]
    assert budget["max_steps"] >= 1 and res["train"]["steps"] == budget["max_steps"]
    assert 0 < budget["probe_s_per_step"] < 30 and budget["overhead_s"] >= 0
    # the steps fill what was left of the budget: at most the whole 30 s at the probed rate
    assert budget["max_steps"] * budget["probe_s_per_step"] <= 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "ie"]  # no probe folder left

# ------------------------------------------------------------------------------------ real data
def test_shared_duie_and_ske_files():
    ie = require_shared_data("ie")
    stats = ReadStats()
    dev = list(read_ie_file(ie / "duie" / "duie_dev.json", stats))
    assert len(dev) == 1000 and stats.kept == 1000 and not stats.skipped
    refs = [format_triples(t) for _, t in dev]
    assert score_texts(refs, refs)["f1"] == 1.0
    assert sum(len(t) for _, t in dev) == score_texts(refs, refs)["n_gold"]
    ske = list(read_ie_file(ie / "ske-sample" / "train_data_sample.json"))
    assert len(ske) == 50 and all(all(isinstance(x, str) and x for x in tr) for _, ts in ske for tr in ts)


def test_datasets_sources_globs_and_csv(tmp_path):
    """The IE builder reads datasets sources (hf:NAME[:SPLIT][?...]), globs and .parquet like its own files."""
    recs = [{"text": f"句子{i}由作者{i}写成", "spo_list": [{"subject": f"句子{i}", "predicate": "作者",
                                                         "object": f"作者{i}"}]} for i in range(3)]
    (tmp_path / "a").mkdir()
    for i, r in enumerate(recs):
        _lines(tmp_path / "a" / f"part{i}.json", [r])
    want = [f"句子{i}由作者{i}写成" for i in range(3)]
    assert [t for t, _ in read_ie_file(f"hf:json:train?data_files={tmp_path}/a/*.json")] == want
    assert [t for t, _ in read_ie_file(f"{tmp_path}/a/*.json")] == want
    pd.DataFrame(recs).to_parquet(tmp_path / "ie.parquet")
    stats = ReadStats()
    assert [t for t, _ in read_ie_file(str(tmp_path / "ie.parquet"), stats)] == want and stats.kept == 3
