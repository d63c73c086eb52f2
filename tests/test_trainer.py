"""The accelerate trainer: exact resume after kill -9 / SIGTERM, accumulation, schedules, SFT freezing, outputs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from instrumented import script_command, script_env
from safetensors.torch import load_file

from config import TrainConfig, make_config
from model.data.checkpoint import latest_checkpoint
from model.training.engine import build_optimizer, build_scheduler
from model.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer, tmp_path_factory):
    from model.tokenizer.build import save_tokenizer
    return str(save_tokenizer(tiny_tokenizer, tmp_path_factory.mktemp("tok")))


def base_kw(tok_dir, demo, out, **kw):
    d = dict(preset="tiny", tokenizer_dir=tok_dir, output_dir=str(out),
             train_file=f"{demo['sft']}:0.3,{demo['corpus']}:0.3", valid_file=demo["sft_valid"], text_mode="mix",
             batch_size_per_gpu=8, max_source_len=32, max_target_len=32, learning_rate=2e-3, warmup_steps=0.2,
             save_steps=5, eval_steps=5, logging_steps=5, max_eval_samples=16, bleu_samples=4, num_threads=1,
             log_with="none", show_progress=False, seed=7, max_steps=16, dropout_rate=0.1)
    d.update(kw)
    return d


def run_cli(kw: dict, signal_at: str) -> subprocess.CompletedProcess:
    """train.py from the command line, signalled after update ``signal_at``'s STEP."""
    args = [sys.executable] + script_command(["train.py", "train"] + [f"--{k}={v}" for k, v in kw.items()],
                                             signal_at=signal_at)
    return subprocess.run(args, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=300)


def weights(out) -> dict:
    return load_file(str(Path(out) / "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.parametrize("streaming", [False, True])
def test_kill9_and_sigterm_then_resume_equals_uninterrupted(tok_dir, demo_data, tmp_path, streaming):
    ref = train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "ref", streaming=streaming,
                                                   shuffle_buffer=40)))
    out = tmp_path / "run"
    kw = base_kw(tok_dir, demo_data, out, streaming=streaming, shuffle_buffer=40)
    if streaming:
        # SIGTERM at step 7: a checkpoint at 7 (not a save step), a clean exit, no final model
        p = run_cli(kw, signal_at="7:SIGTERM")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "SIGTERM: saved" in p.stdout + p.stderr
        assert latest_checkpoint(out).name == "step-7"
        assert not (out / "model.safetensors").exists()
        kw = dict(kw, is_keep_training=True)
    # kill -9 after step 12 (last checkpoint: step 10), from the command line
    p = run_cli(kw, signal_at="12:SIGKILL")
    assert p.returncode == -9, p.stderr[-2000:]
    assert latest_checkpoint(out).name == "step-10"
    assert not (out / "model.safetensors").exists()
    resumed = train(make_config(TrainConfig, **dict(kw, is_keep_training=True)))
    assert resumed["steps"] == 16 and not resumed["interrupted"]
    assert resumed["param_checksum"] == ref["param_checksum"]
    assert_bitwise_equal(weights(out), weights(tmp_path / "ref"))
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == sorted(set(steps))  # the lines a killed run logged after its checkpoint were dropped
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step-15" in kept and len([k for k in kept if k.startswith("step-")]) <= 3
    assert not [k for k in kept if k.startswith(".tmp")]


def test_outputs_are_plain_hf_and_logged(tok_dir, demo_data, tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    res = train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "o", max_steps=10)))
    out = tmp_path / "o"
    assert AutoModelForSeq2SeqLM.from_pretrained(str(out)).config.model_type == "t5"
    assert AutoTokenizer.from_pretrained(str(out))("你好")["input_ids"][-1] == 1
    assert AutoModelForSeq2SeqLM.from_pretrained(str(out / "best")) is not None
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(r["eval_ppl"] > 1 and 0 <= r["bleu"] <= 100 for r in evals)
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert res["best_step"] in (5, 10) and res["tokens_per_s"] > 0


def test_gradient_accumulation_equals_the_big_batch(tok_dir, demo_data, tmp_path):
    """Two micro-batches of 4 give the 8-sample batch's update. Plain SGD without clipping, so each run's weights
    move by lr x gradient and the comparison is of summed gradients (Adam would divide round-off by tiny second
    moments and amplify it; clipping would hide a wrong scale).

    Tolerance: the runs sum the same per-token losses in a different order, a float32 relative difference of at
    most ~3e-5 (about 500 target tokens x 6e-8) per step; over 4 steps the update of each tensor may differ by at
    most ~4 x 3e-5 = 1.2e-4 of its largest element, so the bound is 2e-4 x max |update|. A wrong accumulation
    scale (a loss divided twice) is off by half the update and fails it."""
    kw = dict(group_by_length=False, valid_file=None, dropout_rate=0.0, max_steps=4, save_steps=100,
              lr_scheduler="constant", warmup_steps=0, optimizer="sgd", learning_rate=0.05, max_grad_norm=0)
    train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "init", batch_size_per_gpu=8,
                                             **dict(kw, learning_rate=0.0, max_steps=1))))
    train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "big", batch_size_per_gpu=8, **kw)))
    train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "acc", batch_size_per_gpu=4,
                                             gradient_accumulation_steps=2, **kw)))
    w0, a, b = weights(tmp_path / "init"), weights(tmp_path / "big"), weights(tmp_path / "acc")
    moved = 0
    for k in a:
        update = (a[k] - w0[k]).abs().max().item()
        moved += update > 0
        assert (a[k] - b[k]).abs().max().item() <= 2e-4 * update, k
    assert moved >= len(a) // 2  # the test compares real updates


def _scheduled_lrs(cfg, model, total_steps: int) -> list[float]:
    """The learning rate the project's optimizer and scheduler use at each step."""
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_adafactor_follows_the_schedule():
    torch.manual_seed(0)
    cfg = make_config(TrainConfig, optimizer="adafactor", learning_rate=1e-2, lr_scheduler="cosine",
                      warmup_steps=2, min_lr_ratio=0.0)

    def first_delta(lr_scale):
        lin = torch.nn.Linear(4, 4, bias=False)
        torch.nn.init.constant_(lin.weight, 0.5)
        opt = build_optimizer(cfg, lin)
        for g in opt.param_groups:
            g["lr"] *= lr_scale
        before = lin.weight.detach().clone()
        lin(torch.ones(2, 4)).pow(2).sum().backward()
        opt.step()
        return (lin.weight.detach() - before).abs().sum().item()

    # the LR really scales the update. Doubling the LR doubles lr * update exactly (a power of two); only the
    # rounding of w - lr * update (w = 0.5, ulp 6e-8, updates of about 1e-2) differs: per element at most half an
    # ulp, 3e-8 / 1e-2 = 3e-6 relative to the delta, well under 1e-5, the same on every IEEE-754 CPU.
    assert first_delta(2.0) == pytest.approx(2 * first_delta(1.0), rel=1e-5)
    lrs = _scheduled_lrs(cfg, torch.nn.Linear(4, 4), total_steps=10)
    assert lrs[0] < lrs[2] and lrs[2] == pytest.approx(1e-2) and lrs[-1] < 1e-3


def test_onecycle_rises_then_falls():
    cfg = make_config(TrainConfig, lr_scheduler="onecycle", learning_rate=3e-3, warmup_steps=0.3, div_factor=25)
    lrs = _scheduled_lrs(cfg, torch.nn.Linear(2, 2), total_steps=20)
    peak = lrs.index(max(lrs))
    assert lrs[0] == pytest.approx(3e-3 / 25) and 4 <= peak <= 7 and max(lrs) == pytest.approx(3e-3, rel=0.02)
    assert lrs[-1] < lrs[0]


def test_sft_decoder_only_freezes_encoder_and_embeddings(tiny_model_dir, demo_data, tmp_path):
    from model.training.trainer import train_config
    before = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    cfg = train_config("sft", init_from=str(tiny_model_dir), train_file=demo_data["sft"], valid_file=None,
                       output_dir=str(tmp_path / "sft"), freeze="decoder_only", max_steps=3, batch_size_per_gpu=8,
                       learning_rate=1e-2, max_source_len=32, max_target_len=32, num_threads=1, log_with="none",
                       show_progress=False, save_steps=100, dropout_rate=0.05)
    res = train(cfg)
    assert 0 < res["trainable_params"] < res["params"]
    # --dropout_rate changes the model's config, and only it: the decoding settings stay clean
    saved = {f: json.loads((tmp_path / "sft" / f).read_text()) for f in ("config.json", "generation_config.json")}
    assert saved["config.json"]["dropout_rate"] == 0.05 and "dropout_rate" not in saved["generation_config.json"]
    after = weights(tmp_path / "sft")
    for k, v in after.items():
        if k.startswith("encoder.") or k == "shared.weight":
            assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, before[k]) for k, v in after.items() if k.startswith("decoder."))


def test_clear_errors(tok_dir, demo_data, tmp_path):
    from model.training.trainer import train_config
    with pytest.raises(ValueError, match="needs --init_from"):
        train(make_config(TrainConfig, is_finetune=True, train_file=demo_data["sft"], output_dir=str(tmp_path)))
    bad = tmp_path / "bad.parquet"
    import pandas as pd
    pd.DataFrame({"question": ["a"], "response": ["b"]}).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad\.parquet: no known columns: expected prompt/response.*found "
                                         r"columns: question, response"):
        train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "x", train_file=str(bad))))
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        train(make_config(TrainConfig, **base_kw(tok_dir, demo_data, tmp_path / "y", optimizer="lion")))


def test_metrics_logging_and_plot(tmp_path):
    from model.training.metrics import char_bleu, perplexity
    from model.logging_utils import MetricsLogger, read_jsonl
    from model.training.plots import plot_curves
    assert char_bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100.0)
    full = char_bleu(["今天天气很好，我们去公园散步吧"], ["今天天气很好，我们去公园散步吧"])
    short = char_bleu(["今天天气很好"], ["今天天气很好，我们去公园散步吧"])
    assert short < 0.5 * full  # brevity penalty applies to the whole corpus
    assert perplexity(0.0) == 1.0 and perplexity(1e9) < float("inf")
    log = MetricsLogger(tmp_path / "m.jsonl")
    for s in range(1, 6):
        log.log(step=s, loss=1.0 / s, eval_loss=torch.tensor(2.0 / s))
    MetricsLogger(tmp_path / "m.jsonl", resume_step=3)
    assert [r["step"] for r in read_jsonl(tmp_path / "m.jsonl")] == [1, 2, 3]
    png = plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png")
    assert png is not None and png.stat().st_size > 1000


def test_eval_reports_bits_per_char_and_the_character_baselines(tok_dir, demo_data, tmp_path):
    """eval_bpc = summed target NLL in bits / characters of the targets, recomputed here with plain transformers;
    the baselines equal a CharNgramBaselines fitted here on the same training files."""
    import math
    import pandas as pd
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from model.quality import CharNgramBaselines
    out = tmp_path / "bpc"
    kw = base_kw(tok_dir, demo_data, out, train_file=f"{demo_data['sft']}:1", text_mode="prefix", max_steps=6,
                 save_steps=0, eval_steps=0, bleu_samples=0, max_eval_samples=1000)
    r = train(make_config(TrainConfig, **kw))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    valid = pd.read_parquet(demo_data["sft_valid"])
    nll, chars, targets = 0.0, 0, []
    for p, t in zip(valid.prompt, valid.response):
        src = tok(p, truncation=True, max_length=32, return_tensors="pt")
        tgt = tok(t, truncation=True, max_length=32, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(**src, labels=tgt).loss.item()  # mean over the target tokens
        nll += loss * tgt.shape[1]
        text = tok.decode(tgt[0], skip_special_tokens=True)
        chars += len(text)
        targets.append(text)
    # float32 logits: each per-token loss carries ~1e-6 relative round-off, the sums over a few hundred tokens
    # stay well inside 1e-4
    assert r["eval_bpc"] == pytest.approx(nll / math.log(2) / chars, rel=1e-4)
    sft = pd.read_parquet(demo_data["sft"])
    ref = CharNgramBaselines([x for pair in zip(sft.prompt, sft.response) for x in pair]).bpc(targets)
    assert r["baseline_bigram_bpc"] == pytest.approx(ref["bigram_bpc"], rel=1e-12)  # the same counts, in float64
    assert r["baseline_unigram_bpc"] == pytest.approx(ref["unigram_bpc"], rel=1e-12)
    assert r["baseline_bigram_bpc"] < r["baseline_unigram_bpc"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_bpc" in x for x in rows) and any("baseline_bigram_bpc" in x for x in rows)


def test_copy_figures_on_a_uniform_model_and_on_an_oracle(tiny_tokenizer):
    """Held-out copy figures with known values: a model whose logits are all 0 puts 1/V on every token, so its
    copy loss is ln(V) exactly (up to float32 rounding of a log-sum-exp over V equal terms, far below 1e-4) and
    greedy decoding never copies; an oracle that writes its input back reproduces every row."""
    import math
    from types import SimpleNamespace

    from accelerate import Accelerator

    from config import EOS_ID
    from model.chat_model import TextToTextModel
    from model.training.trainer import Seq2SeqObjective, copy_rows, exact_copy

    rows = copy_rows([[9, 10, 11, EOS_ID], [12, EOS_ID], [EOS_ID], list(range(20, 40)) + [EOS_ID]], 4, 8)
    assert [r.tolist() for r in rows] == [[9, 10, 11, EOS_ID], [12, EOS_ID], list(range(20, 27)) + [EOS_ID]]
    assert exact_copy([0, 9, 10, 11, EOS_ID, 0], rows[0]) and exact_copy([0, 9, 10, 11], rows[0])
    assert not exact_copy([0, 9, 10, 12, EOS_ID], rows[0]) and not exact_copy([0, 9, 10], rows[0])

    torch.manual_seed(0)
    model = TextToTextModel.from_preset("tiny", vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        model.shared.weight.zero_()  # tied to the LM head: every logit is 0
    obj = Seq2SeqObjective(TrainConfig(eval_batch_size=2, copy_max_len=8))
    obj.copy_rows = rows
    acc = Accelerator(cpu=True)
    trainer = SimpleNamespace(acc=acc, rank=0, world=1, inner_model=lambda: model)
    with torch.no_grad():
        got = obj.copy_figures(trainer)
    assert got["copy_samples"] == 3 and got["eval_copy_rate"] == 0.0
    assert abs(got["eval_copy_loss"] - math.log(model.config.vocab_size)) < 1e-4

    class Oracle(torch.nn.Module):
        def target_loss(self, input_ids, attention_mask, labels):
            return torch.tensor(0.0), int((labels != -100).sum())

        def my_generate(self, input_ids, attention_mask, max_new_tokens, search_type):
            out = torch.cat([torch.zeros_like(input_ids[:, :1]), input_ids], dim=1)
            out[out[:, 1] == 12, 1] = 13  # the row [12, EOS] comes out wrong
            return out

    got = obj.copy_figures(SimpleNamespace(acc=acc, rank=0, world=1, inner_model=lambda: Oracle()))
    assert got["eval_copy_rate"] == 2 / 3 and got["eval_copy_loss"] == 0.0


@pytest.mark.parametrize("flags,native", [("fpu sse2 avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                          ("fpu amx_tile amx_bf16", True)])
def test_precision_auto_follows_the_cpus_native_bf16(tmp_path, monkeypatch, flags, native):
    from model.training import engine
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert engine.cpu_has_native_bf16(str(info)) is native
    assert engine.cpu_has_native_bf16(str(tmp_path / "missing")) is False
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    for auto_bf16 in (False, True):
        monkeypatch.setattr(engine, "CPU_AUTO_BF16", auto_bf16)
        assert engine.resolve_precision("auto", cpu=True) == ("bf16" if native and auto_bf16 else "no")
        assert engine.resolve_precision("no", cpu=True) == "no"
        assert engine.resolve_precision("bf16", cpu=True) == "bf16"
