"""Pretraining and SFT with the project's accelerate trainer (logic in model/training/trainer.py).

    accelerate launch train.py --train_file=data/generated/all/my_train_dataset.parquet
    accelerate launch train.py --is_finetune=True --init_from=model_save/pretrain --train_file=sft.parquet
    accelerate launch train.py --is_keep_training=True        # continue exactly after a stop or a kill
    python train.py --stage=demo_pretrain                      # one CPU process works too
    python train.py --help                                     # every field with its type, default and meaning
    python train.py ... --push_to_hub=me/chatlm-sft            # upload the final folder and its model card
    python train.py plan --preset=large                        # GB per GPU under DDP, ZeRO-2, FSDP (PlanConfig)

Every TrainConfig field is a flag (``--learning_rate=1e-4``); ``--stage`` picks a TRAIN_PRESETS entry first.
``python train.py train ...`` works too.
"""
from __future__ import annotations

import json
import os

from config import run_cli


def train(stage: str | None = None, **overrides) -> None:
    from model.training.trainer import train as run_training, train_config  # torch loads after the flags are parsed
    cfg = train_config(stage, **overrides)
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        from model.hub import push_folder, write_model_card
        write_model_card(cfg.output_dir, training_data=str(cfg.train_file))  # with the run's final figures
        if cfg.push_to_hub:
            result["pushed_to"] = push_folder(cfg.output_dir, cfg.push_to_hub)
        print(json.dumps(result, ensure_ascii=False, default=str))


def plan(**overrides) -> None:
    """Print the memory plan of a preset per GPU under DDP, ZeRO-2 and FSDP (every PlanConfig field is a flag)."""
    from config import PlanConfig, make_config
    cfg = make_config(PlanConfig, **overrides)
    from model.training.memory_plan import memory_plan  # torch loads after the flags are checked
    table, rows = memory_plan(cfg)
    print(table)
    print(json.dumps({"preset": cfg.preset, "rows": rows}))


if __name__ == "__main__":
    run_cli(train, default="train", plan=plan)
