"""Pretraining through transformers' ``Seq2SeqTrainer`` (same dataset, collator and model as train.py).

    accelerate launch pre_train.py --train_file=data/generated/all/my_train_dataset.parquet --max_steps=10000
    python pre_train.py --resume_from_checkpoint=True            # continue from the newest checkpoint-N

``--reference_settings=True`` uses the reference project's HF settings (Adafactor, linear schedule, random
sampling) instead of this project's optimizer, schedule and length grouping.
"""
from __future__ import annotations

import json

from config import run_cli


def main(stage: str = "pretrain", reference_settings: bool = False, resume_from_checkpoint=None, **overrides):
    from model.training.trainer import hf_train, train_config
    cfg = train_config(stage, **overrides)
    result = hf_train(cfg, reference_settings=reference_settings, resume_from_checkpoint=resume_from_checkpoint)
    print(json.dumps(result, ensure_ascii=False, default=str))


if __name__ == "__main__":
    run_cli(main)
