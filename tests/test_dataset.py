"""The shared dataset: validation errors, text-to-text transforms, sharding, grouping and exact resume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import EOS_ID, PAD_ID
from model.data.dataset import (Encoder, InMemoryBatches, StreamingBatches, TextToTextDataset, collate_pairs,
                                inspect_source, parse_file_spec)

PROSE = ["春天到了，公园里的花都开了。小朋友们在草地上放风筝！北京是中国的首都，有很多名胜古迹。",
         "每天早上，爷爷都会去河边散步。他喜欢呼吸新鲜的空气？学习是一件快乐的事情。",
         "秋天的稻田一片金黄。农民伯伯忙着收割庄稼。冬天下雪的时候，孩子们在院子里堆雪人。"]


@pytest.fixture(scope="module")
def text_parquet(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "text.parquet"
    rows = [PROSE[i % 3] * (1 + i % 4) for i in range(120)]
    pq.write_table(pa.table({"text": rows}), p, row_group_size=25)  # several row groups: resume must seek
    return p


def test_malformed_parquet_errors_name_file_and_column(tmp_path):
    missing = tmp_path / "missing.parquet"
    pd.DataFrame({"prompt": ["a"], "answer": ["b"]}).to_parquet(missing)
    with pytest.raises(ValueError, match=r"missing\.parquet: missing column 'response'"):
        inspect_source(str(missing))
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "response": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(ValueError, match=r"empty\.parquet: empty file .*prompt, response"):
        inspect_source(str(empty))
    nulls = tmp_path / "nulls.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "response": ["x", None, "z"]}).to_parquet(nulls)
    with pytest.raises(ValueError, match=r"nulls\.parquet: column 'response' has 1 null value.*row 1"):
        inspect_source(str(nulls))
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"text": [1, 2]}).to_parquet(numbers)
    with pytest.raises(ValueError, match=r"numbers\.parquet: column 'text' must hold strings"):
        inspect_source(str(numbers))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable parquet file"):
        inspect_source(str(broken))
    with pytest.raises(FileNotFoundError, match=r"nope\.parquet: data file not found"):
        inspect_source(str(tmp_path / "nope.parquet"))


def test_file_spec_weights():
    assert parse_file_spec("a.parquet:2,b.txt") == [("a.parquet", 2.0), ("b.txt", 1.0)]
    assert parse_file_spec(("c:/x.parquet:0.5",)) == [("c:/x.parquet", 0.5)]
    with pytest.raises(ValueError, match="weight"):
        parse_file_spec("a.parquet:-1")


def test_truncation_is_by_tokens_and_keeps_eos(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, max_source_len=8, max_target_len=5)
    (kind, src, tgt), = enc.encode_rows("pairs", [("把数字42写成中文。" * 5, "42写成中文是四十二。" * 5)])
    assert len(src) == 8 and len(tgt) == 5
    assert src[-1] == EOS_ID and tgt[-1] == EOS_ID
    assert list(src).count(EOS_ID) == 1


def test_prefix_split_at_sentence_boundary(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 64, 64, text_mode="prefix", seed=1)
    (item,) = enc.encode_rows("text", [(PROSE[0],)])
    for epoch in range(5):
        src, tgt = enc.to_pair(item, epoch, (0, 0, 0))
        a = tiny_tokenizer.decode(src, skip_special_tokens=True)
        b = tiny_tokenizer.decode(tgt, skip_special_tokens=True)
        assert a + b == PROSE[0]
        assert a[-1] in "。！？" and src[-1] == EOS_ID and tgt[-1] == EOS_ID


def test_span_corruption_uses_sentinels_and_reconstructs(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 128, 64, text_mode="span", noise_density=0.3, mean_noise_span_length=2.0, seed=3)
    (item,) = enc.encode_rows("text", [(PROSE[1] + PROSE[2],)])
    doc = item[1]
    sentinel = set(enc.sentinel_ids.tolist())
    for epoch in range(4):
        src, tgt = enc.to_pair(item, epoch, (0, 5, 0))
        s_src = [t for t in src if t in sentinel]
        assert s_src and s_src == [t for t in tgt if t in sentinel] == enc.sentinel_ids[: len(s_src)].tolist()
        # put the spans back: the original text comes out
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t in sentinel:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in src[:-1] for x in (spans[t] if t in sentinel else [t])]
        assert rebuilt == doc.tolist()
        noise = len(tgt) - 1 - len(s_src)
        assert abs(noise / len(doc) - 0.3) < 0.1


def test_denoising_targets_the_whole_window_and_the_input_keeps_the_rest(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 128, 128, text_mode="denoise", noise_density=0.3, mean_noise_span_length=2.0,
                  seed=3)
    (item,) = enc.encode_rows("text", [(PROSE[1] + PROSE[2],)])
    doc = item[1].tolist()
    assert len(doc) < 127  # the whole row fits one window, so the target is the row itself
    sentinel = set(enc.sentinel_ids.tolist())
    for epoch in range(4):
        src, tgt = enc.to_pair(item, epoch, (0, 5, 0))
        assert tgt.tolist() == doc + [EOS_ID] and src[-1] == EOS_ID
        s_src = [t for t in src if t in sentinel]
        assert s_src == enc.sentinel_ids[: len(s_src)].tolist() and s_src
        # the input is the text with each noise span cut to one sentinel: its kept tokens appear in order
        kept = [t for t in src[:-1] if t not in sentinel]
        it = iter(doc)
        assert all(t in it for t in kept)
        assert abs((len(doc) - len(kept)) / len(doc) - 0.3) < 0.1


def test_modes_joined_by_plus_draw_each_mode(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 128, 128, text_mode="prefix+denoise", seed=1)
    (item,) = enc.encode_rows("text", [(PROSE[1] + PROSE[2],)])
    doc = item[1].tolist()
    kinds = set()
    for epoch in range(12):
        src, tgt = enc.to_pair(item, epoch, (0, 0, 0))
        kinds.add("denoise" if tgt.tolist() == doc + [EOS_ID] else "prefix")
    assert kinds == {"prefix", "denoise"}
    with pytest.raises(ValueError, match="prefix\\+denoise"):
        Encoder(tiny_tokenizer, 32, 32, text_mode="prefix+typo")


def test_text_pairs_depend_only_on_seed_epoch_key(tiny_tokenizer):
    a = Encoder(tiny_tokenizer, 32, 32, text_mode="mix", seed=5)
    b = Encoder(tiny_tokenizer, 32, 32, text_mode="mix", seed=5)
    (item,) = a.encode_rows("text", [(PROSE[0] * 3,)])
    outs = [a.to_pair(item, e, (0, 1, 0)) for e in range(6)]
    for e, (s, t) in enumerate(outs):
        s2, t2 = b.to_pair(item, e, (0, 1, 0))
        assert s.tolist() == s2.tolist() and t.tolist() == t2.tolist()
        assert len(s) <= 32 and len(t) <= 32
    assert len({tuple(s) for s, _ in outs}) > 1  # a new pair each epoch


def test_dynamic_padding():
    batch = collate_pairs([(np.array([5, 6, EOS_ID]), np.array([7, EOS_ID])), (np.array([5, EOS_ID]),
                                                                                np.array([8, 9, 10, EOS_ID]))])
    assert batch["input_ids"].tolist() == [[5, 6, EOS_ID], [5, EOS_ID, PAD_ID]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, EOS_ID, -100, -100], [8, 9, 10, EOS_ID]]
    assert collate_pairs([(np.array([1]), np.array([1]))], pad_to_multiple_of=8)["input_ids"].shape == (1, 8)


def _epoch_keys(loader, n_batches):
    keys = []
    for _ in range(n_batches):
        keys += loader.next_batch().keys
    return keys


@pytest.mark.parametrize("streaming", [False, True])
def test_sharding_disjoint_equal_and_complete(demo_data, tiny_tokenizer, streaming):
    files = f"{demo_data['sft']},{demo_data['corpus']}"

    def make(rank):
        kw = dict(max_source_len=32, max_target_len=32, text_mode="mix")
        if streaming:
            return StreamingBatches(files, tiny_tokenizer, 16, rank, 2, seed=1, shuffle_buffer=64, **kw)
        return InMemoryBatches(TextToTextDataset(files, tiny_tokenizer, seed=1, **kw), 16, rank, 2, seed=1)

    a, b = make(0), make(1)
    assert a.batches_per_epoch == b.batches_per_epoch
    ka, kb = _epoch_keys(a, a.batches_per_epoch), _epoch_keys(b, b.batches_per_epoch)
    assert len(ka) == len(set(ka)) == len(kb) == len(set(kb))  # nothing twice within an epoch
    assert not set(ka) & set(kb)  # the ranks never share a sample
    total = sum(1 for _ in open(demo_data["corpus"], encoding="utf-8") if _.strip()) + \
        len(pd.read_parquet(demo_data["sft"]))
    assert len(ka) + len(kb) == (total // 2) * 2
    assert a.next_batch().epoch == 1  # the next batch opens the second epoch


def test_weights_repeat_or_subsample(demo_data, tiny_tokenizer):
    n = len(pd.read_parquet(demo_data["sft"]))
    ds = TextToTextDataset(f"{demo_data['sft']}:2.5", tiny_tokenizer, 32, 32, seed=0)
    keys = ds.epoch_keys(0)
    assert len(keys) == 2 * n + round(0.5 * n)
    assert set(keys[:, 2].tolist()) == {0, 1, 2}
    s = StreamingBatches(f"{demo_data['sft']}:0.5,{demo_data['corpus']}:0", tiny_tokenizer, 8, seed=0)
    assert s.epoch_total() == round(0.5 * n)


def test_length_grouping_reduces_padding(demo_data, tiny_tokenizer):
    ds = TextToTextDataset(f"{demo_data['sft']},{demo_data['corpus']}", tiny_tokenizer, 64, 64, seed=0)

    def pad_share(group):
        loader = InMemoryBatches(ds, 16, seed=0, group_by_length=group)
        pads = real = 0
        for _ in range(loader.batches_per_epoch):
            t = loader.next_batch().tensors
            real += int(t["attention_mask"].sum()) + int((t["labels"] != -100).sum())
            pads += t["input_ids"].numel() + t["labels"].numel()
        return 1 - real / pads

    grouped, plain = pad_share(True), pad_share(False)
    assert grouped < 0.6 * plain


@pytest.mark.parametrize("streaming", [False, True])
def test_state_dict_gives_the_exact_next_batch(demo_data, tiny_tokenizer, text_parquet, streaming):
    files = f"{demo_data['sft']}:0.7,{text_parquet}:1.5"

    def make():
        kw = dict(max_source_len=48, max_target_len=32, text_mode="mix")
        if streaming:
            return StreamingBatches(files, tiny_tokenizer, 8, 1, 2, seed=4, shuffle_buffer=50,
                                    length_group_batches=4, read_chunk=16, **kw)
        return InMemoryBatches(TextToTextDataset(files, tiny_tokenizer, seed=4, **kw), 8, 1, 2, seed=4,
                               length_group_batches=4)

    _assert_exact_resume(make, (3, make().batches_per_epoch + 2))  # inside the first epoch and the second


def _assert_exact_resume(make, stops):
    """A loader stopped after each of ``stops`` batches and rebuilt from its state gives the same next epoch."""
    per_epoch = make().batches_per_epoch
    for stop in stops:
        ref = make()
        _epoch_keys(ref, stop)
        state = ref.state_dict()
        expected = [ref.next_batch() for _ in range(per_epoch)]
        resumed = make()
        resumed.load_state_dict(state)
        for want in expected:
            got = resumed.next_batch()
            assert got.keys == want.keys and got.epoch == want.epoch
            for k in want.tensors:
                assert got.tensors[k].equal(want.tensors[k])


def test_streaming_memory_is_bounded_by_the_buffer(tiny_tokenizer, tmp_path):
    p = tmp_path / "big.parquet"
    pq.write_table(pa.table({"prompt": [f"{i}加1等于多少？" for i in range(3000)],
                             "response": [f"{i}加1等于{i + 1}。" for i in range(3000)]}), p, row_group_size=500)
    s = StreamingBatches(str(p), tiny_tokenizer, 8, seed=0, shuffle_buffer=100, group_by_length=False,
                         read_chunk=64)
    seen = 0
    for _ in range(60):
        seen += len(s.next_batch().keys)
        assert len(s.st.buffer) <= 100 and len(s.st.raw) <= 256
        assert all(len(r["rows"]) <= 64 for r in s._readers.values())
    assert seen == 480


def test_empty_rows_are_skipped_and_counted(tiny_tokenizer, tmp_path):
    p = tmp_path / "gaps.parquet"
    pd.DataFrame({"prompt": ["你好", " ", "再见"], "response": ["你好！", "空", ""]}).to_parquet(p)
    ds = TextToTextDataset(str(p), tiny_tokenizer, 16, 16)
    assert len(ds) == 1 and ds.skipped == {str(p): 2}


# ------------------------------------------------------------------------ any dataset in (model/data/sources.py)
PAIRS = [("你好", "你好！"), ("3加5等于多少？", "8"), ("星期四的后一天是星期几？", "星期五"), ("7千米等于多少米？", "7000米")]


def _write_formats(d, pairs):
    """The same pairs in every accepted shape; returns {name: spec}."""
    import json
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    pd.DataFrame({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]}).to_parquet(d / "pairs.parquet")
    out["parquet"] = str(d / "pairs.parquet")
    (d / "trl.jsonl").write_text("".join(json.dumps({"prompt": p, "completion": r}, ensure_ascii=False) + "\n"
                                         for p, r in pairs), encoding="utf-8")
    out["jsonl_completion"] = str(d / "trl.jsonl")
    (d / "alpaca.json").write_text(json.dumps([{"instruction": p, "input": "", "output": r} for p, r in pairs],
                                              ensure_ascii=False), encoding="utf-8")
    out["json_alpaca"] = str(d / "alpaca.json")
    pd.DataFrame({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]}).to_csv(d / "pairs.csv",
                                                                                             index=False)
    out["csv"] = str(d / "pairs.csv")
    (d / "openai.jsonl").write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                                     {"role": "assistant", "content": r}]},
                                                       ensure_ascii=False) + "\n" for p, r in pairs), encoding="utf-8")
    out["messages"] = str(d / "openai.jsonl")
    pq.write_table(pa.table({"conversations": [[{"from": "human", "value": p}, {"from": "gpt", "value": r}]
                                               for p, r in pairs]}), d / "sharegpt.parquet")
    out["sharegpt_parquet"] = str(d / "sharegpt.parquet")
    out["hf_json"] = f"hf:json:train?data_files={d / 'trl.jsonl'}"
    out["hf_stream"] = f"hf:json:train?data_files={d / 'trl.jsonl'}&streaming=true"
    return out


def test_every_format_gives_the_same_rows(tmp_path):
    from model.data.sources import iter_source_rows, open_sources
    for name, spec in _write_formats(tmp_path / "f", PAIRS).items():
        (src,) = open_sources(spec)
        rows = [r for _, rs, _ in iter_source_rows(src, chunk=3) for r in rs]
        assert [tuple(map(str, r)) for r in rows] == PAIRS, name
        assert src.kind == "pairs" and src.num_rows == len(PAIRS) and src.problems.count == 0, name
        if name == "hf_stream":
            assert src.fmt == "stream"
        # a resume starts at any row
        assert [r for _, rs, _ in iter_source_rows(src, start_row=2, chunk=3) for r in rs] == \
            [tuple(r) for r in rows[2:]], name


def test_globs_folders_and_column_mapping(tmp_path):
    import json
    from model.data.sources import open_sources
    d = tmp_path / "many"
    for i in range(3):
        (d / f"part{i}").mkdir(parents=True)
        (d / f"part{i}" / "x.jsonl").write_text(json.dumps({"prompt": f"问{i}", "response": f"答{i}"},
                                                           ensure_ascii=False) + "\n", encoding="utf-8")
    globbed = open_sources(f"{d}/*/x.jsonl:2")
    assert [s.path for s in globbed] == [str(d / f"part{i}" / "x.jsonl") for i in range(3)]
    assert all(s.weight == 2 for s in globbed)
    assert [s.path for s in open_sources(str(d))] == [s.path for s in globbed]  # a folder: every data file
    with pytest.raises(FileNotFoundError, match="no file matches"):
        open_sources(f"{d}/*.nothing")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "问", "answer": "答"}, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no known columns.*question, answer"):
        open_sources(str(qa))
    (src,) = open_sources(f"hf:json:train?data_files={qa}&prompt=question&response=answer")
    assert src.schema == "pairs" and src.mapping == {"prompt": "question", "response": "answer"}


def test_multi_turn_messages_use_the_chat_template(tmp_path, tiny_tokenizer):
    import json
    from model.data.sources import iter_source_rows, open_sources
    conv = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "3加5等于多少？"},
            {"role": "assistant", "content": "8"}]
    p = tmp_path / "multi.jsonl"
    p.write_text(json.dumps({"messages": conv}, ensure_ascii=False) + "\n", encoding="utf-8")
    (src,) = open_sources(str(p))
    ((prompt, response),) = next(iter_source_rows(src))[1]
    assert response == "8"
    assert prompt == tiny_tokenizer.apply_chat_template(conv[:-1], tokenize=False) == \
        "系统：你是助手。\n用户：你好\n助手：你好！\n用户：3加5等于多少？"


def test_bad_rows_are_counted_and_reported_with_file_row_and_field(tmp_path, tiny_tokenizer):
    import json
    from model.data.sources import bad_row_report
    p = tmp_path / "bad.jsonl"
    lines = [json.dumps({"prompt": "你好", "completion": "你好！"}, ensure_ascii=False), "{not json",
             json.dumps({"prompt": "再见", "completion": None}, ensure_ascii=False),
             json.dumps({"prompt": "好", "completion": "好的"}, ensure_ascii=False)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    q = tmp_path / "conv.jsonl"
    q.write_text(json.dumps({"messages": [{"role": "user", "content": "只有问题"}]}, ensure_ascii=False) + "\n"
                 + json.dumps({"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]},
                              ensure_ascii=False) + "\n", encoding="utf-8")
    ds = TextToTextDataset(f"{p},{q}", tiny_tokenizer, 16, 16)
    assert len(ds) == 3 and ds.skipped == {str(p): 2, str(q): 1}
    report = "\n".join(bad_row_report(ds.sources))
    assert f"{p}: 2 bad row(s)" in report and f"{p}:1 (line): a JSON object" in report
    assert f"{p}:2 completion: a string, got NoneType" in report
    assert f"{q}:0 messages: an assistant turn" in report


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("fmt", ["jsonl_completion", "messages", "hf_stream", "csv"])
def test_exact_resume_for_the_new_formats(tmp_path, tiny_tokenizer, fmt, streaming):
    pairs = [(f"{i}加{i % 7}等于多少？", f"{i}加{i % 7}等于{i + i % 7}。") for i in range(90)]
    spec = _write_formats(tmp_path / "r", pairs)[fmt]
    files = f"{spec}:1.5"

    def make():
        kw = dict(max_source_len=24, max_target_len=24)
        if streaming:
            return StreamingBatches(files, tiny_tokenizer, 8, 1, 2, seed=4, shuffle_buffer=20,
                                    length_group_batches=2, read_chunk=16, **kw)
        return InMemoryBatches(TextToTextDataset(files, tiny_tokenizer, seed=4, **kw), 8, 1, 2, seed=4,
                               length_group_batches=2)

    _assert_exact_resume(make, (2, make().batches_per_epoch + 1))


def test_copy_rows_write_a_window_out_again(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 128, 128, text_mode="copy", seed=2, copy_max_len=16)
    (item,) = enc.encode_rows("text", [(PROSE[0] * 3,)])
    doc = item[1].tolist()
    for epoch in range(6):
        src, tgt = enc.to_pair(item, epoch, (0, epoch, 0))
        assert src.tolist() == tgt.tolist() and tgt[-1] == EOS_ID and len(tgt) == 16
        w = tgt[:-1].tolist()
        assert any(doc[i: i + len(w)] == w for i in range(len(doc) - len(w) + 1))  # a contiguous window
    (short,) = enc.encode_rows("text", [("你好。",)])
    assert enc.to_pair(short, 0, (0, 0, 0))[1].tolist() == short[1].tolist() + [EOS_ID]
    with pytest.raises(ValueError, match="copy_max_len"):
        Encoder(tiny_tokenizer, 32, 32, text_mode="copy", copy_max_len=1)


def test_a_weighted_mix_draws_each_mode_at_its_share(tiny_tokenizer):
    enc = Encoder(tiny_tokenizer, 128, 128, text_mode="prefix:3+copy:1+denoise:4", seed=5)
    assert enc.modes == ("prefix", "copy", "denoise") and enc.shares == (3 / 8, 1 / 8, 4 / 8)
    n = 8000
    draws = [enc.draw_mode(enc.rng(e, (0, k, 0))) for e in range(4) for k in range(n // 4)]
    for mode, share in zip(enc.modes, enc.shares):
        # each draw is a Bernoulli(share) trial: the count's standard deviation is sqrt(n p (1-p)); 5 of them
        # leave a chance below 1e-6 of failing for a correct sampler, and catch any share off by 2.5 points
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(draws.count(mode) - n * share) < 5 * sd, (mode, draws.count(mode), n * share)
    # equal shares draw exactly as the unweighted syntax did, so existing runs rebuild the same pairs
    a = Encoder(tiny_tokenizer, 128, 128, text_mode="prefix+denoise", seed=1)
    b = Encoder(tiny_tokenizer, 128, 128, text_mode="prefix:1+denoise:1", seed=1)
    (item,) = a.encode_rows("text", [(PROSE[1] + PROSE[2],)])
    for epoch in range(8):
        pa_, pb_ = a.to_pair(item, epoch, (0, 1, 0)), b.to_pair(item, epoch, (0, 1, 0))
        assert all(x.tolist() == y.tolist() for x, y in zip(pa_, pb_))
    for bad in ("prefix:0+copy", "prefix:x", "copy+copy", "prefix:-1"):
        with pytest.raises(ValueError, match="bad text_mode"):
            Encoder(tiny_tokenizer, 32, 32, text_mode=bad)
