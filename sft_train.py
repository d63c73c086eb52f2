"""SFT through transformers' ``Seq2SeqTrainer`` (same dataset, collator and model as train.py).

    accelerate launch sft_train.py --init_from=model_save/pretrain --train_file=data/sft.parquet --freeze=decoder_only
    python sft_train.py --resume_from_checkpoint=True            # continue from the newest checkpoint-N
"""
from __future__ import annotations

import json

from config import run_cli


def main(stage: str = "sft", reference_settings: bool = False, resume_from_checkpoint=None, **overrides):
    from model.training.trainer import hf_train, train_config
    overrides.setdefault("is_finetune", True)
    cfg = train_config(stage, **overrides)
    result = hf_train(cfg, reference_settings=reference_settings, resume_from_checkpoint=resume_from_checkpoint)
    print(json.dumps(result, ensure_ascii=False, default=str))


if __name__ == "__main__":
    run_cli(main)
