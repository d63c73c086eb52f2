"""Packed rows: block-diagonal attention gives every example exactly the loss it has alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from instrumented import instrumented

from model.chat_model import TextToTextModel
from model.data.dataset import collate_pairs
from model.packing import collate_packed, pack_rows


def _pairs(rng, n, vocab=90):
    out = []
    for _ in range(n):
        s = rng.integers(7, vocab, size=int(rng.integers(2, 12)))
        t = rng.integers(7, vocab, size=int(rng.integers(2, 10)))
        out.append((np.append(s, 1), np.append(t, 1)))  # each side ends with [EOS]
    return out


def _example_losses(model, batch):
    """Each example's summed target loss, in row order, through the trainer's target_loss: the labels of all
    other examples are set to ignored, so only that example's tokens are scored."""
    losses = []
    segments = batch.get("target_segments", (batch["labels"] != -100).long())
    for i in range(batch["labels"].shape[0]):
        for k in range(1, int(segments[i].max()) + 1):
            labels = batch["labels"].clone()
            labels[torch.arange(len(labels)) != i] = -100
            labels[i][segments[i] != k] = -100
            if "decoder_input_ids" not in batch:  # unpacked: keep the decoder inputs of the full labels
                extra = {"decoder_input_ids": model._shift_right(batch["labels"])}
            else:
                extra = {}
            loss, _ = model.target_loss(**dict(batch, labels=labels, **extra))
            losses.append(loss.item())
    return losses


def test_pack_rows_respects_both_capacities_and_keeps_every_example():
    rng = np.random.default_rng(0)
    lengths = np.stack([rng.integers(1, 30, 200), rng.integers(1, 20, 200)], axis=1)
    rows = pack_rows(lengths, 40, 25)
    assert sorted(i for r in rows for i in r) == list(range(200))
    for r in rows:
        assert lengths[r, 0].sum() <= 40 and lengths[r, 1].sum() <= 25
    assert len(rows) < 200 / 2  # short examples really share rows


def test_packed_loss_per_example_equals_unpacked():
    """float64 so that the only difference could be the masking: the masked scores get weight exp(min - max) = 0
    exactly, so packed and unpacked sums differ only by reduction order of the same terms. Bound: relative
    error of a float64 sum of the few hundred terms a token depends on is below 1e-13; we allow 1e-10."""
    torch.manual_seed(0)
    model = TextToTextModel.from_preset("tiny", vocab_size=96, dropout_rate=0.0).double().eval()
    rng = np.random.default_rng(1)
    pairs = _pairs(rng, 7)
    rows = pack_rows(np.array([(len(s), len(t)) for s, t in pairs]), 40, 30)
    assert any(len(r) > 1 for r in rows)
    packed = collate_packed([[pairs[i] for i in r] for r in rows])
    alone = collate_pairs([pairs[i] for r in rows for i in r])  # same example order as the packed rows
    with torch.no_grad():
        total_packed, n_packed = model.target_loss(**packed)
        total_alone, n_alone = model.target_loss(**alone)
        per_packed = _example_losses(model, packed)
        per_alone = _example_losses(model, alone)
    assert int(n_packed) == int(n_alone) == sum(len(t) for _, t in pairs)
    assert total_packed.item() == pytest.approx(total_alone.item(), rel=1e-10)
    assert len(per_packed) == len(pairs) and per_packed == pytest.approx(per_alone, rel=1e-10)
    # the check has teeth: without the block masks the examples of a row see each other
    no_mask = {k: v for k, v in packed.items() if not k.endswith("segments")}
    with torch.no_grad():
        leaked, _ = model.target_loss(**no_mask)
    assert abs(leaked.item() - total_alone.item()) > 1e-3


@pytest.mark.parametrize("streaming", [False, True])
def test_packed_training_resumes_exactly_and_pads_little(tiny_tokenizer, demo_data, tmp_path, streaming):
    """SFT with packing: few padding tokens, every training sample used once per epoch, and a run stopped after
    a checkpoint and continued ends bitwise equal to an uninterrupted one (same machine, same threads)."""
    from config import TrainConfig, make_config
    from model.tokenizer.build import save_tokenizer
    from model.training.trainer import train
    tok = str(save_tokenizer(tiny_tokenizer, tmp_path / "tok"))
    kw = dict(preset="tiny", tokenizer_dir=tok, train_file=demo_data["sft"], valid_file=None, packing=True,
              batch_size_per_gpu=4, max_source_len=64, max_target_len=64, max_steps=10, save_steps=4,
              logging_steps=1, num_threads=1, log_with="none", show_progress=False, seed=5, streaming=streaming,
              learning_rate=2e-3, dropout_rate=0.1)
    ref = train(make_config(TrainConfig, output_dir=str(tmp_path / "a"), **kw))
    assert ref["pad_share"] < 0.10, ref["pad_share"]
    with instrumented(signal_at="6:SIGTERM"):
        stopped = train(make_config(TrainConfig, output_dir=str(tmp_path / "b"), **kw))
    assert stopped["interrupted"] and stopped["steps"] == 6
    resumed = train(make_config(TrainConfig, output_dir=str(tmp_path / "b"), is_keep_training=True, **kw))
    assert resumed["param_checksum"] == ref["param_checksum"]
