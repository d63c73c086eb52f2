"""pre_train.py / sft_train.py: the same dataset, collator and model through transformers' Seq2SeqTrainer."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from model.training.trainer import hf_train, train_config


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer, tmp_path_factory):
    from model.tokenizer.build import save_tokenizer
    return str(save_tokenizer(tiny_tokenizer, tmp_path_factory.mktemp("tok")))


def kw(tok_dir, demo, out, **extra):
    d = dict(preset="tiny", tokenizer_dir=tok_dir, output_dir=str(out), train_file=f"{demo['sft']}:0.2",
             valid_file=None, batch_size_per_gpu=8, max_source_len=32, max_target_len=32, max_steps=6,
             save_steps=3, logging_steps=3, num_threads=1, log_with="none", show_progress=False, seed=3,
             learning_rate=2e-3, dropout_rate=0.0)
    d.update(extra)
    return d


def test_pretrain_resumes_from_checkpoint(tok_dir, demo_data, tmp_path):
    from transformers import AutoModelForSeq2SeqLM
    a = tmp_path / "a"
    res = hf_train(train_config("pretrain", **kw(tok_dir, demo_data, a)))
    assert res["steps"] == 6 and (a / "checkpoint-3").is_dir()
    assert AutoModelForSeq2SeqLM.from_pretrained(str(a)).config.model_type == "t5"
    b = tmp_path / "b"
    shutil.copytree(a / "checkpoint-3", b / "checkpoint-3")
    res_b = hf_train(train_config("pretrain", **kw(tok_dir, demo_data, b, is_keep_training=True)))
    assert res_b["steps"] == 6
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # a run continued from its own checkpoint, same machine: bitwise


def test_reference_settings_and_streaming_run(tok_dir, demo_data, tmp_path):
    res = hf_train(train_config("pretrain", **kw(tok_dir, demo_data, tmp_path / "r", max_steps=3, save_steps=100,
                                                valid_file=demo_data["sft_valid"], eval_steps=3,
                                                max_eval_samples=8)), reference_settings=True)
    assert res["steps"] == 3 and res["eval_loss"] > 0
    res = hf_train(train_config("pretrain", **kw(tok_dir, demo_data, tmp_path / "s", max_steps=3, save_steps=100,
                                                streaming=True, shuffle_buffer=32,
                                                train_file=f"{demo_data['corpus']},{demo_data['sft']}",
                                                text_mode="span")))
    assert res["steps"] == 3


def test_sft_with_freeze(tiny_model_dir, demo_data, tmp_path):
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    res = hf_train(train_config("sft", **kw(None, demo_data, tmp_path / "sft", init_from=str(tiny_model_dir),
                                            freeze="decoder_only", max_steps=2, save_steps=100,
                                            tokenizer_dir="unused")))
    assert res["trainable_params"] < res["params"]
    after = load_file(str(tmp_path / "sft" / "model.safetensors"))
    assert torch.equal(after["encoder.block.0.layer.0.SelfAttention.q.weight"],
                       before["encoder.block.0.layer.0.SelfAttention.q.weight"])
    assert not torch.equal(after["decoder.block.0.layer.0.SelfAttention.q.weight"],
                           before["decoder.block.0.layer.0.SelfAttention.q.weight"])


def test_zero_intervals_mean_off_in_both_trainers(tok_dir, demo_data, tmp_path):
    """--save_steps=0 --eval_steps=0 --logging_steps=0: no checkpoints and no interval logging, the run still
    finishes and exports its model (project trainer and Seq2SeqTrainer alike)."""
    from model.training.trainer import train
    zero = dict(save_steps=0, eval_steps=0, logging_steps=0, valid_file=demo_data["sft_valid"], max_eval_samples=8,
                bleu_samples=0)
    hf = hf_train(train_config("pretrain", **kw(tok_dir, demo_data, tmp_path / "hf", **zero)))
    assert hf["steps"] == 6 and not list((tmp_path / "hf").glob("checkpoint-*"))
    ours = train(train_config("pretrain", **kw(tok_dir, demo_data, tmp_path / "ours", **zero)))
    assert ours["steps"] == 6 and not (tmp_path / "ours" / "checkpoints").exists()
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "ours" / "model.safetensors").is_file()
