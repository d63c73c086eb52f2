"""Preference optimisation (DPO / IPO) of the SFT model, full or LoRA, and LoRA adapter merging.

    python dpo_train.py --sft_model_dir=model_save/sft --train_file=data/generated/dpo/my_dpo_train.parquet
    python dpo_train.py --use_lora=True --output_dir=model_save/dpo_lora     # adapter + merged folder
    accelerate launch dpo_train.py ...                                        # 1..N GPUs
    python dpo_train.py merge --adapter_dir=model_save/dpo_lora --output_dir=model_save/dpo_merged
    python dpo_train.py --help                                                # every DPOConfig field

Every field of ``config.DPOConfig`` is a flag (``--beta=0.2 --loss_type=ipo``); the logic is in model/training/dpo.py.
``python dpo_train.py train ...`` works too.
"""
from __future__ import annotations

import json
import os

from config import DPOConfig, make_config, run_cli


def train(**overrides):
    """Train with DPOConfig defaults overridden by the flags; prints the eval figures as JSON at the end."""
    cfg = make_config(DPOConfig, **overrides)
    from model.training.dpo import train_dpo  # torch loads after the flags are checked
    result = train_dpo(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from model.hub import push_folder, write_model_card
        folder = result.get("merged_dir") or cfg.output_dir  # LoRA: the merged plain folder
        write_model_card(folder, training_data=str(cfg.train_file))
        if cfg.push_to_hub:
            result["pushed_to"] = push_folder(folder, cfg.push_to_hub)
        keys = ("steps", "output_dir", "eval_before", "eval_after", "train_time_s", "pushed_to")
        print(json.dumps({k: result[k] for k in keys if k in result}, ensure_ascii=False))


def merge(adapter_dir: str, output_dir: str, base_model_dir: str | None = None):
    """Fold a LoRA adapter into its base model (default: the one named in adapter_config.json) and write a
    plain Hugging Face T5 folder."""
    from model.training.dpo import merge_lora
    print(f"merged model written to {merge_lora(adapter_dir, output_dir, base_model_dir)}")


if __name__ == "__main__":
    run_cli(train, default="train", merge=merge)
