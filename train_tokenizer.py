"""Train the project's tokenizer on a corpus of any size, in memory that does not grow with it.

    python train_tokenizer.py --inputs data/generated/all/my_corpus.txt --token_type char --vocab_size 29298
    python train_tokenizer.py --inputs data/my_train.parquet --columns prompt,response --output_dir model_save/tok
    python train_tokenizer.py --inputs corpus.txt --sentencepiece unigram      # or bpe
    python train_tokenizer.py --preset demo                                     # the demo corpus, in seconds

Inputs: text files (one text a line), ``.jsonl`` (``--columns`` fields), ``.parquet`` (``--columns``, default
every string column), globs and folders, comma-separated. Every option of ``TokenizerTrainConfig``
(config.py) is a flag. Writes ``tokenizer.json``, ``tokenizer_config.json`` and
``training_stats.json`` to ``--output_dir``; load with ``AutoTokenizer.from_pretrained(output_dir)``.
``--help`` lists every option with its type, default and meaning.
"""
from __future__ import annotations

import json

from config import TOKENIZER_PRESETS, TokenizerTrainConfig, make_config, run_cli
from model.tokenizer.build import train_from_config


def main(preset: str = "default", **overrides):
    cfg = make_config(TokenizerTrainConfig, preset, TOKENIZER_PRESETS, **overrides)
    tok, stats = train_from_config(cfg)
    print(json.dumps(stats, ensure_ascii=False))


if __name__ == "__main__":
    run_cli(main)
