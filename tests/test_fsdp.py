"""FSDP2 through the one training loop: two CPU processes over gloo, launched with accelerate from
configs/accelerate_fsdp.yaml, against DDP on the same data and seed; sharded checkpoints resumed exactly after a
kill -9; the exported folder loads in plain transformers; LoRA and full DPO under FSDP; SFT on two "machines"."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import DDP, FSDP, explain, launch, launch_machines

U = 2.0 ** -24  # fp32 unit roundoff
STEPS = 8


def flags(tok_dir, demo, out: Path, **kw) -> dict:
    d = dict(preset="tiny", tokenizer_dir=tok_dir, output_dir=out, train_file=f"{demo['sft']}:0.2",
             valid_file=demo["sft_valid"], batch_size_per_gpu=4, max_source_len=32, max_target_len=32,
             max_steps=STEPS, save_steps=4, eval_steps=4, logging_steps=1, max_eval_samples=11, bleu_samples=0,
             baselines=False, learning_rate=1e-3, lr_scheduler="constant", warmup_steps=0, dropout_rate=0.1,
             num_threads=1, log_with="none", show_progress=False)
    d.update(kw)
    return d


def train_logs(out: Path) -> dict[int, dict]:
    """step -> the logged training figures of that update."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def final(out: Path) -> dict:
    return json.loads((out / "debug" / "final_rank0.json").read_text())


@pytest.fixture(scope="module")
def tok_dir(tiny_tokenizer, tmp_path_factory):
    from model.tokenizer.build import save_tokenizer
    return str(save_tokenizer(tiny_tokenizer, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def fsdp_run(tok_dir, demo_data, tmp_path_factory) -> Path:
    """An uninterrupted FSDP run from scratch: the reference of the tests below."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    p = launch(FSDP, "train.py", flags(tok_dir, demo_data, out))
    assert p.returncode == 0, explain(p)
    assert "2 process(es)" in p.stdout
    return out


def test_fsdp_first_updates_equal_ddp(fsdp_run, tok_dir, demo_data, tmp_path):
    """Same data, seed and optimizer: the runs differ only in the order fp32 gradients are summed across ranks
    (DDP all-reduces whole gradients, FSDP reduce-scatters shards) and in how the clipping norm is summed.

    Tolerance of the loss: those orders change each gradient element by a few units of U; AdamW's first updates
    are m / sqrt(v), invariant to the gradient's scale, so the weights after an update differ by O(U) relative.
    The next logged loss is an fp32 computation whose a-priori rounding bound (a sum of n terms: (n - 1) U
    relative, Higham) is set by its longest reductions: the T target tokens of a rank's update and dot products of
    length d_ff; an O(U) change of the weights moves it within (T + d_ff) U relative. Measured: the first update
    bitwise equal, the next ones about 1 U apart. Adam cannot see a wrongly scaled gradient (sum instead of mean
    over ranks), so the gradient norm before clipping is compared too: each parameter's squared norm is one fp32
    sum of at most its numel terms (the embedding, vocab x d_model), a relative bound of numel U."""
    from config import MODEL_PRESETS
    ddp = tmp_path / "ddp"
    p = launch(DDP, "train.py", flags(tok_dir, demo_data, ddp, max_steps=3, save_steps=0, eval_steps=0))
    assert p.returncode == 0, explain(p)
    tiny = MODEL_PRESETS["tiny"]
    loss_tol = (4 * 32 + tiny["d_ff"]) * U  # T = batch 4 x 32 target tokens
    norm_tol = 1024 * tiny["d_model"] * U  # the tokenizer's 1,024 ids x d_model
    a, b = train_logs(fsdp_run), train_logs(ddp)
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=loss_tol), step
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=norm_tol), step
    assert a[2]["loss"] != pytest.approx(a[1]["loss"], rel=100 * loss_tol)  # the updates moved the loss


def test_fsdp_kill9_resumes_bitwise_from_sharded_checkpoint(fsdp_run, tok_dir, demo_data, tmp_path):
    out = tmp_path / "killed"
    kw = flags(tok_dir, demo_data, out)
    p = launch(FSDP, "train.py", kw, signal_at="6:SIGKILL")  # every rank kills itself after update 6
    assert p.returncode != 0
    ckpt = out / "checkpoints" / "step-4"
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-4"]
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard file per rank (torch.distributed.checkpoint)
        assert len(list((ckpt / part).glob("*.distcp"))) == 2, part
    assert (ckpt / "rank_state0.pkl").is_file() and (ckpt / "rank_state1.pkl").is_file()
    assert not (out / "model.safetensors").exists()
    p = launch(FSDP, "train.py", dict(kw, is_keep_training=True))
    assert p.returncode == 0, explain(p)
    assert "resumed from" in p.stdout
    assert final(out)["param_checksum"] == final(fsdp_run)["param_checksum"]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(fsdp_run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in (0, 1):  # each rank went on with the batches it would have drawn
        rows = [json.loads(x) for x in (out / "debug" / f"samples_rank{r}.jsonl").read_text().splitlines()]
        ref = [json.loads(x) for x in (fsdp_run / "debug" / f"samples_rank{r}.jsonl").read_text().splitlines()]
        assert rows[-(STEPS - 4):] == ref[4:]


def test_fsdp_export_is_a_plain_hf_folder(fsdp_run, tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from model.training.engine import param_checksum
    model, info = T5ForConditionalGeneration.from_pretrained(str(fsdp_run), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert param_checksum(model) == final(fsdp_run)["param_checksum"]  # the gathered weights, as trained
    assert AutoTokenizer.from_pretrained(str(fsdp_run))("你好")["input_ids"][-1] == 1
    model.save_pretrained(str(tmp_path / "plain"))  # one copy of the tied embedding, as a plain save writes
    assert load_file(str(fsdp_run / "model.safetensors")).keys() == load_file(
        str(tmp_path / "plain" / "model.safetensors")).keys()


def dpo_flags(sft_dir: Path, demo, out: Path, **kw) -> dict:
    return dict(sft_model_dir=sft_dir, train_file=demo["dpo"], output_dir=out, max_steps=3, batch_size_per_gpu=4,
                max_source_len=32, max_target_len=32, save_steps=2, eval_steps=0, logging_steps=1, num_threads=1,
                log_with="none", show_progress=False, **kw)


def dpo_result(p) -> dict:
    """The figures dpo_train.py prints as its last line."""
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_fsdp_lora_dpo_adapter_merges(fsdp_run, demo_data, tmp_path):
    """LoRA DPO on the FSDP-trained model under FSDP: the adapter is written whole (not a rank's shard) and merges
    into a plain folder whose attention weights are W + (alpha / r) B A."""
    from transformers import T5ForConditionalGeneration

    from config import DPOConfig
    r, scale = DPOConfig.lora_r, DPOConfig.lora_alpha / DPOConfig.lora_r
    out = tmp_path / "lora"
    p = launch(FSDP, "dpo_train.py", dpo_flags(fsdp_run, demo_data, out, use_lora=True, learning_rate=1e-3))
    assert p.returncode == 0, explain(p)
    res = dpo_result(p)
    assert res["eval_after"]["loss"] < res["eval_before"]["loss"]
    adapter = load_file(str(out / "adapter_model.safetensors"))
    prefix = "base_model.model.encoder.block.0.layer.0.SelfAttention.q"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert a.shape == (r, 128) and b.shape == (128, r) and b.abs().max() > 0  # whole, and trained (B starts at 0)
    base = T5ForConditionalGeneration.from_pretrained(str(fsdp_run)).state_dict()
    merged = T5ForConditionalGeneration.from_pretrained(str(out / "merged")).state_dict()
    delta = scale * b @ a
    # merging adds an fp32 product of r terms to W: within r U of scale |B| |A|, plus one rounding of W + delta
    bound = r * U * (scale * b.abs() @ a.abs()) + U * (base["encoder.block.0.layer.0.SelfAttention.q.weight"]
                                                        + delta).abs()
    err = (merged["encoder.block.0.layer.0.SelfAttention.q.weight"]
           - base["encoder.block.0.layer.0.SelfAttention.q.weight"] - delta).abs()
    assert bool((err <= bound).all())
    untouched = [k for k in base if not any(f".{m}.weight" in k for m in "qkvo")]
    assert untouched and all(torch.equal(base[k], merged[k]) for k in untouched)


def test_fsdp_full_dpo(fsdp_run, demo_data, tmp_path):
    from transformers import T5ForConditionalGeneration
    out = tmp_path / "full"
    p = launch(FSDP, "dpo_train.py", dpo_flags(fsdp_run, demo_data, out, learning_rate=1e-4))
    assert p.returncode == 0, explain(p)
    res = dpo_result(p)
    assert res["eval_after"]["loss"] < res["eval_before"]["loss"]
    before = T5ForConditionalGeneration.from_pretrained(str(fsdp_run)).state_dict()
    after = T5ForConditionalGeneration.from_pretrained(str(out)).state_dict()
    assert before.keys() == after.keys() and not torch.equal(before["shared.weight"], after["shared.weight"])


def test_two_machines_train_sft_and_checkpoint(fsdp_run, demo_data, tmp_path):
    """Two "machines" (two accelerate launches, one process each, machine ranks 0 and 1) run FSDP SFT from the
    FSDP-trained model into one shared output folder: both ranks' shards and data positions are in each
    checkpoint, and the main machine alone writes the final model."""
    out = tmp_path / "sft"
    machine_config = ["--config_file", "configs/accelerate_fsdp.yaml"]  # the machine flags below override its 1 x 2
    kw = dict(is_finetune=True, init_from=fsdp_run, train_file=f"{demo_data['sft']}:0.2",
              valid_file=demo_data["sft_valid"], output_dir=out, batch_size_per_gpu=4, max_source_len=32,
              max_target_len=32, max_steps=4, save_steps=2, eval_steps=0, logging_steps=1, max_eval_samples=8,
              bleu_samples=0, num_threads=1, log_with="none", show_progress=False)
    machines = launch_machines(machine_config, "train.py", kw)
    for p in machines:
        assert p.returncode == 0, explain(p)
    assert "2 process(es)" in machines[0].stdout and '"steps": 4' in machines[0].stdout
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step}"
        assert (ckpt / "rank_state0.pkl").is_file() and (ckpt / "rank_state1.pkl").is_file()
        assert len(list((ckpt / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert (out / "model.safetensors").is_file()
