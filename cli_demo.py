"""Terminal chat with streaming answers and multi-turn history.

    python cli_demo.py --model_dir=model_save/sft [--search_type=sampling] [--engine=ct2]

Type ``exit`` to quit and ``cls`` to clear the screen and the history. Any InferConfig field can be given.
The loop lives in model/infer.py (chat_loop).
"""
from __future__ import annotations

import sys

import fire

from config import InferConfig, make_config


def main(**overrides) -> None:
    from rich.console import Console
    from transformers.utils import logging as hf_logging

    from model.infer import ChatBot, chat_loop
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the chat window
    console = Console()
    try:
        cfg = make_config(InferConfig, **overrides)
        with console.status(f"loading {cfg.model_dir} ..."):
            bot = ChatBot(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(1)
    chat_loop(bot, console)


if __name__ == "__main__":
    fire.Fire(main)
