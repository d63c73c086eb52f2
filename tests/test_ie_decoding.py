"""Constrained triple decoding and entity-swap augmentation."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from config import EOS_ID
from finetune_examples.info_extract.augment import augment, role_pools, swap_entities
from finetune_examples.info_extract.constrained import STRUCTURE, Grammar, State, TripleConstraint, token_pieces
from finetune_examples.info_extract.data_process import in_sentence_order, make_prompt
from finetune_examples.info_extract.evaluate import source_sentence, generate_responses
from model.data.checkpoint import load_model_folder

SENTENCE = "步步惊心的作者是桐华"
# one piece per token id; 0 and 1 are specials (no text), 1 is the end token
PIECES = ["", ""] + list("[](),") + ["),(", ")]"] + list("步惊心的作者是桐华写") + ["作者", "桐华", "导演"]


def _ids(*pieces: str) -> tuple[int, ...]:
    return tuple(PIECES.index(p) for p in pieces)


def _allowed(c: TripleConstraint, *pieces: str) -> set[str]:
    return {PIECES[i] or "<eos>" for i in c.allowed(0, _ids(*pieces))}


def _constraint(**kw) -> TripleConstraint:
    return TripleConstraint([SENTENCE], PIECES, eos_id=1, predicates=["作者", "导演"], **kw)


def test_the_grammar_opens_a_list_and_copies_spans_from_the_sentence():
    c = _constraint()
    assert _allowed(c) == {"["}
    assert _allowed(c, "[") == {"(", "]"}  # an empty list is an answer
    # a subject grows only along the sentence: 步 then 步 (步步 is in it), never 写 (not in it)
    first = _allowed(c, "[", "(")
    assert "写" not in first and {"步", "桐", "桐华"} <= first
    assert _allowed(c, "[", "(", "步", "步") == {"惊", ","}  # 步步 continues only as 步步惊, or is the subject
    # the predicate is one of the known ones: 作 then 者, or the whole word; 的 is not a predicate
    pred = _allowed(c, "[", "(", "步", "步", "惊", "心", ",")
    assert pred == {"作", "作者", "导演"}


def test_the_list_closes_and_only_then_may_end():
    c = _constraint()
    done = ("[", "(", "步", "步", "惊", "心", ",", "作者", ",", "桐华")
    assert "<eos>" not in _allowed(c, *done)
    assert {")", "),(", ")]"} <= _allowed(c, *done)
    assert _allowed(c, *done, ")]") == {"<eos>"}
    assert _allowed(c, *done, ")") == {",", "]"}


def test_a_repeated_triple_ends_the_list():
    c = _constraint()
    triple = ("(", "步", "步", "惊", "心", ",", "作者", ",", "桐华", ")")
    assert _allowed(c, "[", *triple, ",", *triple) == {"]"}


def test_masked_scores_pick_the_best_allowed_token():
    c = _constraint()
    scores = torch.zeros(1, len(PIECES))
    scores[0, PIECES.index("写")] = 10.0  # the model's favourite breaks the rule (写 is not in the sentence)
    scores[0, PIECES.index("桐")] = 5.0
    seq = torch.tensor([[0, *_ids("[", "(")]])  # the decoder starts with its start token
    out = c(seq, scores)
    assert PIECES[int(out.argmax())] == "桐"
    assert torch.isinf(out[0, PIECES.index("写")])


def test_beams_of_one_row_share_its_sentence():
    c = TripleConstraint(["桐华", "导演"], PIECES, eos_id=1, num_beams=2)
    seq = torch.tensor([[0, *_ids("[", "(")]] * 4)
    out = c(seq, torch.zeros(4, len(PIECES)))
    allowed = [{PIECES[i] for i in torch.nonzero(torch.isfinite(out[r])).flatten().tolist()} for r in range(4)]
    assert allowed[0] == allowed[1] and allowed[2] == allowed[3]
    assert "桐" in allowed[0] and "桐" not in allowed[2]


def test_a_random_model_under_the_constraint_writes_only_what_the_grammar_allows(tiny_model_dir, demo_data):
    """Whatever the weights, each output is a prefix of the grammar: subjects and objects are spans of its
    sentence (as the model reads it) and predicates known ones. An untrained model is the hardest case."""
    model, tok = load_model_folder(tiny_model_dir)
    lines = [line[:24] for line in Path(demo_data["corpus"]).read_text(encoding="utf-8").splitlines() if line][:4]
    pieces = token_pieces(tok)
    assert len(pieces) == len(tok) and pieces[EOS_ID] == ""
    chars = [p for p in pieces if len(p) == 1 and p not in STRUCTURE]
    predicates = {chars[3] + chars[4], chars[5]}
    prompts = [make_prompt(line) for line in lines]
    out = generate_responses(model, tok, prompts, max_new_tokens=40, progress=False, constrained=True,
                             predicates=predicates)
    for prompt, text in zip(prompts, out):
        sentence = source_sentence(tok, tok(prompt)["input_ids"])
        assert text.startswith("[") and State().after(text, Grammar(sentence, frozenset(predicates))), text


PAIRS = [
    ("《步步惊心》的作者是桐华", [("步步惊心", "作者", "桐华")]),
    ("《花千骨》作者：fresh果果", [("花千骨", "作者", "fresh果果")]),
    ("《琅琊榜》由海宴所写，海宴是作者", [("琅琊榜", "作者", "海宴")]),
    ("张三的妻子是李四", [("张三", "妻子", "李四")]),
]


def test_an_entity_swap_renames_consistently_within_its_role():
    pools = role_pools(PAIRS)
    assert pools[("作者", 2)] == sorted(["桐华", "fresh果果", "海宴"])
    text, triples = swap_entities(*PAIRS[2], pools, random.Random(0))
    (s, p, o), = triples
    assert p == "作者" and s in {"步步惊心", "花千骨"} and o in {"桐华", "fresh果果"}
    assert text == f"《{s}》由{o}所写，{o}是作者"  # every mention renamed, the rest of the sentence kept


def test_a_swap_needs_another_name_and_whole_entities():
    pools = role_pools(PAIRS)
    assert swap_entities(*PAIRS[3], pools, random.Random(0)) is None  # 妻子 has no other names
    nested = ("华山的华", [("华山", "位于", "华")])
    assert swap_entities(*nested, role_pools([nested, ("泰山在山东", [("泰山", "位于", "山东")])]),
                         random.Random(0)) is None  # 华 is inside 华山: renaming would tear it
    missing = ("一句话", [("步步惊心", "作者", "桐华")])
    assert swap_entities(*missing, pools, random.Random(0)) is None


def test_augment_counts_what_it_leaves_out_and_repeats_with_its_seed():
    out, failed = augment(PAIRS, copies=3, seed=7)
    assert len(out) + failed == 3 * len(PAIRS)
    assert failed >= 3  # the 妻子 pair has no other names, in every copy
    assert out == augment(PAIRS, copies=3, seed=7)[0]
    for text, triples in out:
        for s, _, o in triples:
            assert s in text and o in text


def test_sentence_order_sorts_by_where_subject_then_object_first_appear():
    text = "《花千骨》作者fresh果果，《琅琊榜》作者海宴，花千骨主演霍建华"
    triples = [("琅琊榜", "作者", "海宴"), ("花千骨", "主演", "霍建华"), ("花千骨", "作者", "fresh果果"),
               ("不在句中", "作者", "某人")]
    assert in_sentence_order(text, triples) == [("花千骨", "作者", "fresh果果"), ("花千骨", "主演", "霍建华"),
                                                ("琅琊榜", "作者", "海宴"), ("不在句中", "作者", "某人")]
