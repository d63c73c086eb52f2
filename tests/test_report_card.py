"""The report card gathers the stages' summary.json files and nothing else; absent stages say "not run"."""
from __future__ import annotations

import json

from config import PIPELINE_PROFILES, PipelineConfig, make_config
from eval.report_card import gather, write_report_card


def _summary(folder, stage: str, figures: dict, wall_s: float = 1.0, finished: str = "2026-12-01 10:00:00"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"stage": stage, "commands": [], "wall_s": wall_s,
                                                     "peak_rss_mb": 100.0, "finished": finished,
                                                     "figures": figures}), encoding="utf-8")


def test_report_card_gathers_summaries_and_publishes_text_and_plots(tmp_path):
    root = tmp_path / "root"
    rows = [{"step": s, "loss": 5.0 - s / 10, "lr": 1e-3} for s in range(1, 21)] + [
        {"step": 10, "eval_loss": 3.9, "eval_copy_loss": 2.5, "eval_copy_rate": 0.0},
        {"step": 20, "eval_loss": 3.5, "eval_copy_loss": 0.5, "eval_copy_rate": 0.25}]
    (root / "sft").mkdir(parents=True)
    (root / "sft" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _summary(root / "sft", "sft", {"loss": 3.0, "files": {"metrics": "metrics.jsonl"}}, wall_s=30.0)
    _summary(root / "eval" / "ceval", "ceval", {
        "overall": {"subjects": 2, "n": 40, "accuracy": 0.3125, "chance": 0.25, "chance_interval_95": [0.12, 0.38]},
        "per_category": {"STEM": {"subjects": 1, "n": 20, "accuracy": 0.35},
                         "Other": {"subjects": 1, "n": 20, "accuracy": 0.275}}}, wall_s=12.0,
             finished="2026-12-01 11:00:00")
    _summary(root / "ie", "ie", {"runs": {"from the pretrained model": {
        "dev": {"precision": 0.5, "recall": 0.25, "f1": 0.333}, "steps": 40, "train_minutes": 2.0,
        "f1_curve": [[20, 0.125], [40, 0.333]]}}})
    _summary(root / "chat", "chat", {"heldout": [{"prompt": "3加5", "answer": "8", "expected": "8", "correct": True}],
                                     "samples": [{"prompt": "你好", "answer": "你好", "top_token_share": 0.5}],
                                     "degenerate": 1, "distinct_2": 0.5, "generation": "max_new_tokens 64",
                                     "passage": {"n": 2, "contains_gold": 1, "questions": [
                                         {"prompt": "短文：甲是乙。\n问题：甲是什么？", "answer": "乙", "answers": ["乙"],
                                          "contains_gold": True},
                                         {"prompt": "短文：丙是丁。\n问题：丙是什么？", "answer": "戊", "answers": ["丁"],
                                          "contains_gold": False}]}})
    _summary(root, "final", {"source": "sft", "decoding": {"n": 64, "chosen": {"repetition_penalty": 1.3}, "grid": [
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "degenerate": 2, "answers": 64, "distinct_2": 0.25,
         "mean_tokens": 8.0}]}}, wall_s=0.0)
    (root / "model.safetensors").write_bytes(b"weights")
    assert set(gather(root)) == {"sft", "ceval", "ie", "chat", "final"}
    cfg = make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(root), publish_dir=str(tmp_path / "docs"))
    text = write_report_card(cfg).read_text(encoding="utf-8")
    assert "last loss 3.000" in text and "last eval loss 3.500" in text
    assert "| STEM | 1 | 20 | 0.350 |" in text and "average accuracy 0.312" in text
    assert "| f1 | 0.333 |" in text and "| training steps | 40 |" in text
    assert "1 of 1 correct" in text and "distinct-2 over the answers: 0.500" in text
    # 2 of 64 is within the 5% bound (3.2 answers), so the card names the mildest-setting rule
    assert "(not the prompts above): the mildest setting with at most 5% degenerate answers" in text
    assert "| 1.3 | 3 | 2 of 64 | 0.250 | 8.0 |" in text
    assert "## Data\n\nnot run" in text and "## Tokenizer\n\nnot run" in text  # absent stages say so
    assert "| sft | 30.0 | 100 |" in text and "Total: 44 s" in text
    published = sorted(p.relative_to(tmp_path / "docs").as_posix() for p in (tmp_path / "docs").rglob("*")
                       if p.is_file())
    assert "- sft: onset at step 20; final copy loss 0.500, exact copy rate 0.250" in text
    assert "| 20 | 0.125 |" in text and "| 40 | 0.333 |" in text  # the F1-versus-updates table
    assert "1 of 2 answers contain a gold span" in text and "| 丙是什么？ | 戊 | 丁 | False |" in text
    assert published == ["plots/ceval_categories.png", "plots/copy.png", "plots/ie_f1.png", "plots/sft_curves.png",
                         "report.md"]


def test_data_and_tokenizer_sections_come_from_their_summaries(tmp_path):
    root = tmp_path / "root"
    dropped = {"empty": 1, "duplicate": 2}
    _summary(root / "data", "data", {"sources": {"a": {"rows_read": 10, "kept": 7, "dropped": dropped,
                                                       "chars_in": 100, "chars_out": 70}},
                                     "totals": {"rows_read": 10, "kept": 7, "dropped": dropped, "chars_in": 100,
                                                "chars_out": 70, "adds_up": True},
                                     "outputs": {"my_train_dataset.parquet": 7}})
    _summary(root / "tokenizer", "tokenizer", {"vocab_size": 1024, "token_type": "char", "chars_per_token": 1.5,
                                               "distinct_pieces": 300, "texts": 10})
    text = write_report_card(make_config(PipelineConfig, "demo", PIPELINE_PROFILES, root=str(root))).read_text()
    assert "| a | 10 | 7 | 1 | 2 | 100 | 70 |" in text and "Read = kept + dropped: True" in text
    assert "vocabulary: 1,024 tokens (char level)" in text and "characters per token on the validation split: 1.500" in text


def test_ie_section_says_when_its_two_runs_shared_the_machine_side_by_side(tmp_path):
    from eval.report_card import ie_section
    run = {"dev": {"f1": 0.25}, "steps": 10, "train_minutes": 1.0}
    _summary(tmp_path / "ie", "ie", {"runs": {"pretrained": run, "random init": run}})
    summaries = gather(tmp_path)
    said = "The two runs ran side by side, 1 thread each, for the same wall-clock budget."
    assert said in ie_section(summaries, tmp_path, {"num_threads": 1}, side_by_side=True)
    assert "side by side" not in ie_section(summaries, tmp_path, {"num_threads": 1}, side_by_side=False)
    assert "side by side, 2 threads each" in ie_section(summaries, tmp_path, {"num_threads": 2}, side_by_side=True)
