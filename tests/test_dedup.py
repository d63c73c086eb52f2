"""Exact and near-duplicate removal: hashing, signatures, LSH banding, verification, streaming, tables."""
from __future__ import annotations

import random

import numpy as np
import pytest

from utils.dedup import (DropDatasetDuplicate, ExactDeduper, U64Table, _perm_params, band_keys, candidate_probability,
                         choose_bands, jaccard, minhash_signatures, shingle_hashes, shingle_set)

RNG = random.Random(7)
CJK = [chr(c) for c in range(0x4E00, 0x4E00 + 3000)]


def rand_text(n: int, rng=RNG) -> str:
    return "".join(rng.choice(CJK) for _ in range(n))


def edit(text: str, k: int, rng=RNG) -> str:
    t = list(text)
    for _ in range(k):
        i = rng.randrange(len(t))
        op = rng.random()
        if op < 0.34:
            t[i] = rng.choice(CJK)
        elif op < 0.67 and len(t) > 1:
            del t[i]
        else:
            t.insert(i, rng.choice(CJK))
    return "".join(t)


def test_jaccard_and_shingles():
    assert shingle_set("abcd", 3) == {"abc", "bcd"}
    assert shingle_set("ab", 3) == {"ab"}
    assert jaccard("abcd", "abcd") == 1.0
    assert jaccard("abcd", "bcde") == pytest.approx(1 / 3)
    assert jaccard("", "") == 1.0


def test_choose_bands_catches_the_threshold():
    b, r = choose_bands(128, 0.85)
    assert (b, r) == (16, 8)
    assert candidate_probability(0.85, b, r) >= 0.99
    assert candidate_probability(0.3, b, r) < 0.01
    b, r = choose_bands(256, 0.85)
    assert b * r <= 256 and candidate_probability(0.85, b, r) >= 0.99


def test_shingle_hashes_layout():
    texts = ["abcd", "", "ab", "xabcd", "中文文本"]
    h, off = shingle_hashes(texts, 3)
    assert off.tolist() == [0, 2, 2, 3, 6, 8]
    # the same n-gram hashes the same in every document
    assert h[0] == h[4] and h[1] == h[5]  # "abc", "bcd" in doc 0 and doc 3
    assert len(set(h[6:8].tolist())) == 2
    h4, off4 = shingle_hashes(["abcdef"], 4)
    assert off4.tolist() == [0, 3]


def test_signature_estimates_match_exact_jaccard():
    a, b = _perm_params(128, 1)
    base = [rand_text(RNG.randint(40, 200)) for _ in range(300)]
    pairs = [(t, edit(t, RNG.randint(1, max(1, len(t) // 10)))) for t in base]
    texts = [x for p in pairs for x in p]
    h, off = shingle_hashes(texts, 3)
    sig = minhash_signatures(h, off, a, b)
    est = (sig[0::2] == sig[1::2]).mean(axis=1)
    true = np.array([jaccard(x, y) for x, y in pairs])
    err = est - true
    assert abs(err.mean()) < 0.01  # unbiased
    assert err.std() < 0.05  # about sqrt(J(1-J)/128)


def test_empty_documents_have_no_band_keys():
    a, b = _perm_params(16, 1)
    h, off = shingle_hashes(["", "abc"], 3)
    sig = minhash_signatures(h, off, a, b)
    keys = band_keys(sig, 4, 4, empty=off[1:] == off[:-1])
    assert (keys[0] == 0).all() and (keys[1] != 0).all()


def test_near_duplicates_found_and_distinct_texts_kept():
    base = [rand_text(120) for _ in range(50)]
    docs = base + [edit(base[i], 2) for i in range(0, 50, 5)] + [base[3]]
    with DropDatasetDuplicate(threshold=0.85, num_perm=128, store="memory") as d:
        res = d.find_duplicates(docs)
    dups = set(res.duplicates.tolist())
    expected = {50 + k for k, i in enumerate(range(0, 50, 5)) if jaccard(base[i], docs[50 + k]) >= 0.85} | {60}
    assert expected <= dups
    assert dups <= set(range(50, 61))
    for i, j, jac in res.pairs:
        assert jac >= 0.85 and i < j


def test_same_characters_in_another_order_are_not_duplicates():
    # the reference hashed single characters, so any reordering looked identical
    a = "今天天气很好我们一起去公园散步吧然后再去吃晚饭"
    b = "".join(sorted(a))
    assert set(a) == set(b)
    with DropDatasetDuplicate(store="memory") as d:
        assert d.add_batch([a, b]).tolist() == [False, False]


def test_streaming_batches_match_one_batch(tmp_path):
    base = [rand_text(80) for _ in range(200)]
    docs = []
    for i, t in enumerate(base):
        docs.append(t)
        if i % 4 == 0:
            docs.append(edit(t, 1))
    RNG.shuffle(docs)
    with DropDatasetDuplicate(store="memory") as one:
        whole = one.find_duplicates(docs).duplicates.tolist()
    with DropDatasetDuplicate(store="disk", store_dir=str(tmp_path)) as stream:
        masks = [stream.add_batch(docs[i:i + 37]) for i in range(0, len(docs), 37)]
        streamed = np.flatnonzero(np.concatenate(masks)).tolist()
        assert stream.index_nbytes > 0
    assert streamed == whole
    assert len(whole) >= 40


def test_reference_api_add_doc_get_duplicate_indexs():
    d = DropDatasetDuplicate(threshold=0.85, num_perm=128)
    texts = ["今天天气很好，我们去公园散步吧", "完全不同的一句话，没有关系", "今天天气很好，我们去公园散步吧！", "另外一句"]
    for i, t in enumerate(texts):
        d.add_doc(f"id{i}", t)
    assert d.get_duplicate_indexs() == {"id2"}
    d.close()


def test_parallel_workers_give_the_same_result():
    base = [rand_text(60) for _ in range(300)]
    docs = base + [edit(t, 1) for t in base[:60]]
    with DropDatasetDuplicate(store="memory", workers=1) as d1:
        r1 = d1.find_duplicates(docs).duplicates.tolist()
    with DropDatasetDuplicate(store="memory", workers=2, parallel_min_docs=10) as d2:
        r2 = d2.find_duplicates(docs).duplicates.tolist()
    assert r1 == r2


def test_recall_and_precision_on_planted_pairs():
    rng = random.Random(3)
    base = [rand_text(rng.randint(30, 300), rng) for _ in range(1500)]
    planted = []
    docs = list(base)
    for i in rng.sample(range(len(base)), 150):
        docs.append(edit(base[i], rng.randint(1, max(1, len(base[i]) // 25)), rng))
        planted.append((i, len(docs) - 1))
    with DropDatasetDuplicate(store="memory", record_pairs=True) as d:
        res = d.find_duplicates(docs)
    found = {(i, j) for i, j, _ in res.pairs}
    positives = [(i, j) for i, j in planted if jaccard(docs[i], docs[j]) >= 0.85]
    assert len(positives) > 50
    recall = sum((i, j) in found for i, j in positives) / len(positives)
    assert recall >= 0.95
    assert all(jaccard(docs[i], docs[j]) >= 0.85 for i, j in found)  # verified: precision 1


def test_u64_table_matches_a_python_set():
    rng = np.random.default_rng(0)
    t = U64Table(np.uint64, capacity_log2=4, with_values=True)
    seen = {}
    for _ in range(20):
        keys = rng.integers(1, 5000, 700, dtype=np.uint64)
        vals = rng.integers(0, 1 << 30, 700).astype(np.uint32)
        present = t.insert(keys, vals)
        exp = []
        for k, v in zip(keys.tolist(), vals.tolist()):
            exp.append(k in seen)
            seen.setdefault(k, v)
        assert present.tolist() == exp
    q = np.arange(1, 6000, dtype=np.uint64)
    got = t.lookup(q)
    assert got.tolist() == [seen.get(k, -1) for k in q.tolist()]
    assert t.size == len(seen)


def test_u32_table_and_zero_keys():
    t = U64Table(np.uint32)
    present = t.insert(np.array([0, 5, 5, 7], np.uint32), np.array([1, 2, 3, 4], np.uint32))
    assert present.tolist() == [False, False, True, False]
    assert t.lookup(np.array([0, 5, 7, 9], np.uint32)).tolist() == [-1, 2, 4, -1]


def test_exact_deduper():
    e = ExactDeduper()
    assert e.add_batch(["a", "b", "a"]).tolist() == [False, False, True]
    assert e.add_batch(["b", "c"]).tolist() == [True, False]


def test_shingle_codes_are_exact():
    from utils.dedup import shingle_codes
    texts = ["abcd", "", "ab", "中文文本abc", "x"]
    codes, off = shingle_codes(texts, 3)
    got = [set(codes[off[i]:off[i + 1]].tolist()) for i in range(len(texts))]
    for i, t in enumerate(texts):
        assert len(got[i]) == len(shingle_set(t, 3))
    assert got[0] & got[3] == {codes[0]}  # "abc" is in both, nothing else
    assert not (got[2] & got[0])  # the short text "ab" is not the n-gram "ab?"
    for i in range(len(texts)):
        for j in range(len(texts)):
            if got[i] or got[j]:
                inter = len(got[i] & got[j])
                assert inter / len(got[i] | got[j]) == pytest.approx(jaccard(texts[i], texts[j]))


def test_chain_across_batches_uses_the_stored_text_of_a_dropped_document(tmp_path):
    rng = random.Random(11)
    a = rand_text(200, rng)
    b = edit(a, 4, rng)
    c = edit(b, 4, rng)
    assert jaccard(a, b) >= 0.85 and jaccard(b, c) >= 0.85 and jaccard(a, c) < 0.85  # c only matches b
    with DropDatasetDuplicate(store="disk", store_dir=str(tmp_path), record_pairs=True) as d:
        assert d.add_batch([a]).tolist() == [False]
        assert d.add_batch([b]).tolist() == [True]
        assert d.add_batch([c]).tolist() == [True]
        assert all(j >= 0.85 for _, _, j in d.pairs)


def test_closing_twice_does_not_close_another_store(tmp_path):
    d1 = DropDatasetDuplicate(store="disk", store_dir=str(tmp_path))
    d1.add_batch(["第一个文档的内容"])
    d1.close()
    d2 = DropDatasetDuplicate(store="disk", store_dir=str(tmp_path))  # may get the same descriptor number
    d1.close()
    del d1
    assert d2.add_batch(["第二个文档的内容", "第二个文档的内容"]).tolist() == [False, True]
    d2.close()


def test_pipelined_batches_give_the_same_result_as_sequential(tmp_path):
    rng = random.Random(5)
    base = [rand_text(rng.randint(20, 150), rng) for _ in range(600)]
    docs = base + [edit(t, 1, rng) for t in base[:150]] + base[:40]
    rng.shuffle(docs)
    batches = [docs[i:i + 97] for i in range(0, len(docs), 97)]
    with DropDatasetDuplicate(store="disk", store_dir=str(tmp_path), workers=1, record_pairs=True) as d1:
        m1 = np.concatenate(list(d1.add_batches(batches)))
        p1 = sorted(d1.pairs)
    with DropDatasetDuplicate(store="disk", store_dir=str(tmp_path), workers=2, record_pairs=True) as d2:
        m2 = np.concatenate(list(d2.add_batches(batches)))
        p2 = sorted(d2.pairs)
    assert m1.tolist() == m2.tolist() and m1.sum() >= 150
    assert p1 == p2
