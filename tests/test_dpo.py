"""DPO: the objective against a hand computation, LoRA (only adapters train), merging, resume, data building."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from instrumented import script_command, script_env
from transformers import AutoModelForSeq2SeqLM

from config import DPOConfig, make_config
from model.chat_model import TextToTextModel
from model.data.checkpoint import load_model_folder, save_model_folder
from model.data.preference_data import PreferenceDataset, collate_pairs, epoch_batches, read_preference_file
from model.training.dpo import PairScorer, add_lora, compute_reference_logps, dpo_loss, train_dpo
from helpers import require_shared_data

BETA = 0.1


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny "SFT" model with spread-out weights, so log-probabilities differ between responses."""
    torch.manual_seed(3)
    model = TextToTextModel.from_preset("tiny", vocab_size=len(tiny_tokenizer))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model_folder(model, tiny_tokenizer, tmp_path_factory.mktemp("dpo") / "sft")


@pytest.fixture(scope="module")
def pairs(demo_data):
    return pd.read_parquet(demo_data["dpo"])


def _cfg(sft_dir, demo_data, out, **kw):
    base = dict(sft_model_dir=str(sft_dir), train_file=demo_data["dpo"], valid_file=None, output_dir=str(out),
                batch_size_per_gpu=4, learning_rate=2e-3, epochs=1, save_steps=0, eval_steps=0, logging_steps=1,
                num_threads=1, show_progress=False, warmup_steps=0.0, lr_scheduler="constant")
    base.update(kw)
    return make_config(DPOConfig, **base)


def _hand_logp(model, tok, prompt: str, response: str) -> tuple[float, int]:
    """log p(response | prompt) from the model's own token cross-entropy, one pair at a time, no padding."""
    enc = tok(prompt, return_tensors="pt")
    labels = tok(response, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
    n = labels.shape[1]
    return -loss.item() * n, n


# ------------------------------------------------------------------------------------------ objective
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_hand_computation(sft_dir, pairs, loss_type):
    """In float64, the batched path (padding, one encoder pass shared by chosen and rejected) and the one-pair
    computation differ only in summation order. Each log-prob is a sum of <= 128 terms below 30 nats, each from
    a log-softmax over ~2k logits: the round-off bound n * eps * sum|terms| is about 128 * 1.1e-16 * 6e4 < 1e-9,
    which is the tolerance (the figures themselves are of order 1 to 100)."""
    ref, tok = load_model_folder(sft_dir, device="cpu")
    ref = ref.double()
    policy = TextToTextModel.from_pretrained(str(sft_dir)).double()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    policy.eval()
    rows = pairs.iloc[[0, 5, 17, 20]].reset_index(drop=True)  # different prompt and response lengths
    ds = PreferenceDataset(rows, tok, max_source_len=128, max_target_len=128)
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch["labels"].shape[0] == 2 * len(rows)
    with torch.no_grad():
        logp_pol, n_tok = PairScorer(policy)(batch["input_ids"], batch["attention_mask"], batch["labels"])
        logp_ref, _ = PairScorer(ref)(batch["input_ids"], batch["attention_mask"], batch["labels"])
    b = len(rows)
    if loss_type == "ipo":
        pc, pr = logp_pol[:b] / n_tok[:b], logp_pol[b:] / n_tok[b:]
        rc, rr = logp_ref[:b] / n_tok[:b], logp_ref[b:] / n_tok[b:]
    else:
        pc, pr, rc, rr = logp_pol[:b], logp_pol[b:], logp_ref[:b], logp_ref[b:]
    losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type)

    for i, row in rows.iterrows():
        vals = {}
        for name, m in (("pol", policy), ("ref", ref)):
            for side in ("chosen", "rejected"):
                lp, n = _hand_logp(m, tok, row["prompt"], row[side])
                vals[name, side] = lp / n if loss_type == "ipo" else lp
        h = (vals["pol", "chosen"] - vals["ref", "chosen"]) - (vals["pol", "rejected"] - vals["ref", "rejected"])
        expect = -math.log(1 / (1 + math.exp(-BETA * h))) if loss_type == "sigmoid" else (h - 1 / (2 * BETA)) ** 2
        assert losses[i].item() == pytest.approx(expect, abs=1e-9)
        assert cr[i].item() == pytest.approx(BETA * (vals["pol", "chosen"] - vals["ref", "chosen"]), abs=1e-9)
        assert rj[i].item() == pytest.approx(BETA * (vals["pol", "rejected"] - vals["ref", "rejected"]), abs=1e-9)
    # the policy really differs from the reference, so the check above is not 0 == 0
    assert (cr - rj).abs().max().item() > 1e-3


def test_dpo_loss_properties():
    z = torch.zeros(3)
    losses, cr, rj = dpo_loss(z, z, z, z, beta=0.5)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    better, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-4.0]), z[:1], z[:1], beta=0.5)
    worse, _, _ = dpo_loss(torch.tensor([-4.0]), torch.tensor([0.0]), z[:1], z[:1], beta=0.5)
    assert better.item() < math.log(2) < worse.item()
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, loss_type="hinge2")


def test_precomputed_reference_equals_frozen_model(sft_dir, pairs):
    """The model runs in float64 (round-off below 1e-9, see above); the table stores float32, so each entry
    may differ from the exact value by half a float32 ulp: |x| * 2**-24."""
    ref, tok = load_model_folder(sft_dir, device="cpu")
    ref = ref.double()
    ds = PreferenceDataset(pairs, tok, 128, 128)
    chosen, rejected = compute_reference_logps(ref, ds, batch_size=5, show_progress=False)
    for i in (0, 9, 23):
        lp_c, _ = _hand_logp(ref, tok, ds_text(pairs, i, "prompt"), ds_text(pairs, i, "chosen"))
        lp_r, _ = _hand_logp(ref, tok, ds_text(pairs, i, "prompt"), ds_text(pairs, i, "rejected"))
        assert chosen[i].item() == pytest.approx(lp_c, abs=abs(lp_c) * 2 ** -24 + 1e-9)
        assert rejected[i].item() == pytest.approx(lp_r, abs=abs(lp_r) * 2 ** -24 + 1e-9)


def ds_text(df, i, col):
    return df.iloc[i][col]


def test_truncation_is_by_tokens_and_keeps_prompt_eos(sft_dir, pairs):
    _, tok = load_model_folder(sft_dir, device="cpu")
    ds = PreferenceDataset(pairs, tok, max_source_len=4, max_target_len=5)
    assert ds.report["truncated"] > 0
    assert all(len(p) <= 4 and p[-1] == 1 for p in ds.prompt)
    assert all(len(c) <= 5 for c in ds.chosen) and all(len(r) <= 5 for r in ds.rejected)
    assert ds.report["pairs"] + ds.report["skipped_same_after_truncation"] == len(pairs)


def test_epoch_batches_deterministic_and_complete():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10, 11]
    a = epoch_batches(lengths, 3, seed=1, epoch=0)
    assert a == epoch_batches(lengths, 3, seed=1, epoch=0)
    assert a != epoch_batches(lengths, 3, seed=1, epoch=1)
    assert sorted(i for b in a for i in b) == list(range(len(lengths)))


# ------------------------------------------------------------------------------------------ training
def test_full_dpo_raises_margin_and_accuracy(sft_dir, demo_data, tmp_path):
    res = train_dpo(_cfg(sft_dir, demo_data, tmp_path / "full", epochs=3))
    before, after = res["eval_before"], res["eval_after"]
    # before training the policy IS the reference, scored in the same batches (same sort, same size): exactly 0
    assert before["rewards/margins"] == 0.0
    assert after["rewards/margins"] > 0.5
    assert after["rewards/accuracies"] > 0.8
    assert after["loss"] < before["loss"]
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lr"} <= set(train_lines[0])
    eval_lines = [x for x in lines if x["split"] == "eval"]
    assert eval_lines[0]["step"] == 0 and eval_lines[-1]["step"] == res["steps"]
    assert eval_lines[-1]["eval/rewards/margins"] == pytest.approx(after["rewards/margins"])
    assert (tmp_path / "full" / "dpo_curves.png").is_file()
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "full"))  # a plain HF folder
    assert model.config.model_type == "t5"


@pytest.mark.parametrize("use_lora", [False, True])
def test_kill9_then_resume_equals_uninterrupted_run(sft_dir, demo_data, tmp_path, use_lora):
    """kill -9 after step 7 (last checkpoint: step 4; 6 steps per epoch, so the resumed part crosses an epoch),
    continue, and compare with an uninterrupted run: same seed, threads and order of operations on one CPU, so
    the weights must be bitwise equal. LoRA keeps its dropout on, so the RNG state must be restored too."""
    import subprocess
    import sys

    from model.data.checkpoint import latest_checkpoint
    from model.training.engine import param_checksum
    kw = dict(max_steps=9, lr_scheduler="cosine", warmup_steps=2, save_steps=4, use_lora=use_lora, lora_r=4,
              lora_dropout=0.1, merge_lora=False, log_with="none")
    ref = train_dpo(_cfg(sft_dir, demo_data, tmp_path / "a", **kw))
    out_b = tmp_path / "b"
    flags = _cfg(sft_dir, demo_data, out_b, **kw).__dict__
    args = [f"--{k}={','.join(v) if isinstance(v, (tuple, list)) else v}" for k, v in flags.items() if v is not None]
    p = subprocess.run([sys.executable] + script_command(["dpo_train.py", "train", *args], signal_at="7:SIGKILL"),
                       cwd=Path(__file__).resolve().parents[1], env=script_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert latest_checkpoint(out_b).name == "step-4"
    res = train_dpo(_cfg(sft_dir, demo_data, out_b, is_keep_training=True, **kw))
    assert res["steps"] == 9 and "eval_before" not in res
    assert res["param_checksum"] == ref["param_checksum"]
    sft = TextToTextModel.from_pretrained(str(sft_dir))
    assert ref["param_checksum"] != param_checksum(sft)  # training changed the weights
    steps = [r["step"] for r in map(json.loads, (out_b / "metrics.jsonl").read_text().splitlines())
             if r.get("split") == "train"]
    assert steps == sorted(set(steps))  # what the killed run logged after its checkpoint was dropped


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_wraps_only_target_modules(sft_dir):
    model = TextToTextModel.from_pretrained(str(sft_dir))
    cfg = make_config(DPOConfig, lora_target_modules="q,v", lora_r=4)
    peft_model = add_lora(model, cfg)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(n.split(".lora_")[0].endswith((".q", ".v")) for n in names)


@pytest.fixture(scope="module")
def lora_run(sft_dir, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "dpo_lora"
    cfg = _cfg(sft_dir, demo_data, out, use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, epochs=2,
               learning_rate=5e-3, precompute_ref_logps=False)
    return out, train_dpo(cfg)


def test_lora_trains_only_adapter_parameters(lora_run, sft_dir):
    from peft import PeftModel
    out, res = lora_run
    assert res["eval_after"]["rewards/margins"] > res["eval_before"]["rewards/margins"]
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    base = TextToTextModel.from_pretrained(str(sft_dir))
    sft_state = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = PeftModel.from_pretrained(base, str(out))
    changed_lora = 0
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            changed_lora += int(p.abs().sum().item() > 0)
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p, sft_state[key]), name  # base weights untouched
    assert changed_lora > 0


def test_merge_equals_adapter_model(lora_run, sft_dir, tmp_path):
    from peft import PeftModel

    import dpo_train
    out, res = lora_run
    merged_dir = Path(res["merged_dir"])
    again = tmp_path / "merged_cli"
    dpo_train.merge(adapter_dir=str(out), output_dir=str(again))  # base model from adapter_config.json
    tok = load_model_folder(sft_dir, device="cpu")[1]
    enc = tok(["3加5等于多少？", "你好"], padding=True, return_tensors="pt")
    dec = torch.tensor([[0, 5, 9, 11], [0, 7, 7, 3]])
    adapter_model = PeftModel.from_pretrained(TextToTextModel.from_pretrained(str(sft_dir)), str(out)).eval()
    base = TextToTextModel.from_pretrained(str(sft_dir)).eval()
    with torch.no_grad():
        want = adapter_model(**enc, decoder_input_ids=dec).logits
        base_logits = base(**enc, decoder_input_ids=dec).logits
        for d in (merged_dir, again):
            assert json.loads((d / "config.json").read_text())["model_type"] == "t5"
            merged = AutoModelForSeq2SeqLM.from_pretrained(str(d)).eval()  # plain transformers, no peft
            got = merged(**enc, decoder_input_ids=dec).logits
            assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(base_logits, want, atol=1e-3)  # the adapter mattered


# ---------------------------------------------------------------------------------------- bad input
def test_bad_preference_file_errors(tmp_path):
    p = tmp_path / "bad.parquet"
    pd.DataFrame({"prompt": ["a"], "chosen": ["b"]}).to_parquet(p)
    with pytest.raises(ValueError, match=r"bad\.parquet.*rejected"):
        read_preference_file(p)
    q = tmp_path / "nulls.parquet"
    pd.DataFrame({"prompt": ["a", None, "c"], "chosen": ["b", "x", "  "], "rejected": ["c", "y", "z"]}).to_parquet(q)
    df, report = read_preference_file(q)
    assert len(df) == 1 and report["skipped_empty"] == 2
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_preference_file(tmp_path / "missing.parquet")


# --------------------------------------------------------------------------------------- data process
def _write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def test_build_reads_every_schema_and_counts_drops(tmp_path, tiny_tokenizer):
    from model.tokenizer.build import save_tokenizer
    from utils.dpo_data_process import build
    tok_dir = save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    src = tmp_path / "src"
    src.mkdir()
    _write_json(src / "lf_conv.json", [
        {"conversations": [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "你好"}],
         "chosen": {"from": "gpt", "value": "你好！"}, "rejected": {"from": "gpt", "value": "不知道"}},
        {"conversations": [{"from": "human", "value": "一加一"}, {"from": "gpt", "value": "二"},
                           {"from": "human", "value": "再加一"}],
         "chosen": {"from": "gpt", "value": "三"}, "rejected": {"from": "gpt", "value": "三"}},  # same
    ])
    _write_json(src / "ranked.json", [
        {"instruction": "写一句话", "input": "关于春天", "output": ["春天来了。", "不会", "好"],
         "history": [["你是谁", "我是模型"]]},
        {"instruction": "空的", "input": "", "output": ["", "有"], "history": []},  # empty chosen
        {"instruction": "坏的", "output": "只有一个"},  # malformed: not a ranked list
    ])
    (src / "med.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"conversations": [{"from": "human", "value": "头疼怎么办"}], "chosen": "多休息", "rejected": "吃糖"},
        {"conversations": [{"from": "human", "value": "头疼怎么办"}], "chosen": "多休息", "rejected": "吃糖"},  # dup
    ]) + "\n", encoding="utf-8")
    (src / "reward.json").write_text(  # JSON lines despite the suffix, as in MedicalGPT
        json.dumps({"question": "长问题" * 60, "response_chosen": "a", "response_rejected": "b"}) + "\n" +
        json.dumps({"question": "发烧", "response_chosen": "多喝水", "response_rejected": "跑步",
                    "system": "", "history": []}) + "\n", encoding="utf-8")
    (src / "LICENSE").write_text("not data")
    rep = build(inputs=str(src), tokenizer_dir=str(tok_dir), out_dir=str(tmp_path / "out"), max_source_len=64,
                max_target_len=64, valid_ratio=0.0)
    files = {Path(k).name: v for k, v in rep["files"].items()}
    assert files["lf_conv.json"] == {"read": 2, "skipped_same": 1, "kept": 1}
    assert files["ranked.json"]["bad_record"] == 1 and files["ranked.json"]["skipped_empty"] == 1
    assert files["med.jsonl"]["skipped_duplicate"] == 1
    assert files["reward.json"]["skipped_too_long"] == 1
    df = pd.read_parquet(tmp_path / "out" / "my_dpo_train.parquet")
    assert list(df.columns) == ["prompt", "chosen", "rejected"] and len(df) == rep["train"] == 4
    # multi-turn and system text joined by the data pipeline's reader, exactly as for SFT data
    from model.prompt import join_history
    multi = join_history([("user", "你是谁"), ("assistant", "我是模型")], "写一句话\n关于春天")
    assert set(df.prompt) == {join_history([], "你好", "你是助手"), multi, "头疼怎么办", "发烧"}
    assert df.set_index("prompt").loc[multi, "chosen"] == "春天来了。"


def test_unknown_schema_is_a_clear_error(tmp_path, tiny_tokenizer):
    from utils.dpo_data_process import iter_preference_pairs
    p = _write_json(tmp_path / "odd.json", [{"q": "x", "a": "y"}])
    with pytest.raises(ValueError, match=r"odd\.json.*no record matches a preference schema"):
        list(iter_preference_pairs(p))


def test_generate_rejected_uses_batched_greedy_sft_answers(sft_dir, tmp_path):
    from utils.dpo_data_process import generate
    src = tmp_path / "qa.parquet"
    qa = pd.DataFrame({"prompt": ["3加5等于多少？", "你好", "中国的首都是哪里？", "", "把数字42写成中文。"],
                       "response": ["3加5等于8。", "你好！", "北京。", "空", "四十二"]})
    qa.to_parquet(src)
    out = tmp_path / "gen.parquet"
    rep = generate(sft_model_dir=str(sft_dir), input_file=str(src), out_file=str(out), batch_size=2,
                   max_new_tokens=6, device="cpu")
    assert rep["read"] == 5 and rep["skipped_empty"] >= 1
    assert rep["kept"] + sum(v for k, v in rep.items() if k.startswith("skipped_")) == 5
    df = pd.read_parquet(out)
    model, tok = load_model_folder(sft_dir, device="cpu")
    for _, row in df.iterrows():
        assert row["chosen"] == qa.set_index("prompt").loc[row["prompt"], "response"]
        enc = tok(row["prompt"], return_tensors="pt")
        one = tok.decode(model.my_generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=6)[0],
                         skip_special_tokens=True).strip()
        assert row["rejected"] == one


def test_build_on_shared_dpo_data(tmp_path, tiny_tokenizer):
    root = require_shared_data("dpo")
    from model.tokenizer.build import save_tokenizer
    from utils.dpo_data_process import build
    tok_dir = save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    rep = build(inputs=str(root), tokenizer_dir=str(tok_dir), out_dir=str(tmp_path / "out"), max_source_len=256,
                max_target_len=256, valid_ratio=0.1)
    files = {Path(k).name: v for k, v in rep["files"].items()}
    assert {k: v["read"] for k, v in files.items()} == {
        "dpo_zh_demo.json": 300, "hist_oaast_rm_zh.json": 775, "dpo_zh_500.jsonl": 500,
        "hist_dpo_zh.jsonl": 429, "hist_reward_test.json": 100}
    assert all(v.get("bad_record", 0) == 0 for v in files.values())
    assert files["hist_dpo_zh.jsonl"]["skipped_duplicate"] > 0  # the same pairs as dpo_zh_500 in another schema
    assert rep["train"] > 100 and rep["valid"] > 5
    tr = pd.read_parquet(rep["train_file"])
    va = pd.read_parquet(rep["valid_file"])
    assert not set(tr.prompt) & set(va.prompt)
    assert (tr.chosen != tr.rejected).all()


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent device)")
@pytest.mark.parametrize("use_lora", [False, True])
def test_dpo_on_gpu_with_mixed_precision(sft_dir, demo_data, tmp_path, use_lora):
    """The CUDA path: bf16 autocast (fp16 where bf16 is missing), reference table on the CPU, batches on GPU."""
    res = train_dpo(_cfg(sft_dir, demo_data, tmp_path / "gpu", epochs=3, use_lora=use_lora,
                         learning_rate=5e-3 if use_lora else 2e-3, mixed_precision="auto"))
    assert res["eval_before"]["rewards/margins"] == pytest.approx(0.0, abs=1e-2)
    assert res["eval_after"]["rewards/margins"] > 0.3
    folder = tmp_path / "gpu" / ("merged" if use_lora else "")
    assert AutoModelForSeq2SeqLM.from_pretrained(str(folder)).config.model_type == "t5"


def test_a_small_preference_set_still_holds_out_one_prompt():
    from utils.dpo_data_process import split_by_prompt
    rows = [{"prompt": f"问题{i}", "chosen": "好", "rejected": "坏"} for i in range(4)]
    train, valid = split_by_prompt(rows, 0.1, seed=1)
    assert len(valid) >= 1 and len(train) + len(valid) == 4
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in valid}
    assert split_by_prompt(rows[:1], 0.1, seed=1) == (rows[:1], [])  # one prompt: nothing to hold out
    assert split_by_prompt(rows, 0.0, seed=1) == (rows, [])


def test_build_and_generate_read_datasets_sources_and_csv(tmp_path, tiny_tokenizer):
    """Preference and prompt/response inputs also come as datasets sources (hf:NAME[:SPLIT][?...]) and .csv."""
    from collections import Counter
    from model.tokenizer.build import save_tokenizer
    from utils.dpo_data_process import build, read_prompt_answer
    tok_dir = save_tokenizer(tiny_tokenizer, tmp_path / "tok")
    rows = [{"prompt": f"问题{i}", "chosen": f"好的回答{i}", "rejected": f"坏{i}"} for i in range(6)]
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    pd.DataFrame(rows + [{"prompt": "缺", "chosen": None, "rejected": "x"}]).to_csv(tmp_path / "pairs.csv",
                                                                                   index=False)
    rep = build(inputs=f"hf:json:train?data_files={jl}", tokenizer_dir=str(tok_dir), out_dir=str(tmp_path / "o1"),
                max_source_len=64, max_target_len=64, valid_ratio=0.0)
    assert rep["train"] == 6
    rep = build(inputs=str(tmp_path / "pairs.csv"), tokenizer_dir=str(tok_dir), out_dir=str(tmp_path / "o2"),
                max_source_len=64, max_target_len=64, valid_ratio=0.0)
    (counts,) = rep["files"].values()
    assert rep["train"] == 6 and counts["bad_record"] + counts.get("skipped_empty", 0) == 1
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["chosen"]}]},
                                      ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    got = read_prompt_answer(f"hf:json:train?data_files={sft}", Counter())
    assert got == [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows]
    assert read_prompt_answer(str(sft), Counter(), limit=2) == got[:2]
