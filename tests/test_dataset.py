"""The shared dataset: validation errors, text-to-text transforms, sharding, grouping and exact resume."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from config import EOS_ID, PAD_ID
from model.dataset import (Encoder, InMemoryBatches, StreamingBatches, TextToTextDataset, collate_pairs,
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

    ref = make()
    per_epoch = ref.batches_per_epoch
    for stop in (3, per_epoch + 2):  # inside the first epoch and inside the second
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
