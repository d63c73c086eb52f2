"""Terminal chat with streaming answers and multi-turn history.

    python cli_demo.py --model_dir=model_save/sft [--search_type=sampling] [--engine=ct2]
    python cli_demo.py --help                      # every InferConfig field with its type, default and meaning

Type ``exit`` to quit and ``cls`` to clear the screen and the history. Any InferConfig field can be given.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Optional

from rich.console import Console
from rich.text import Text

from config import InferConfig, make_config, run_cli


def chat_loop(bot, console: Optional[Console] = None, read: Optional[Callable[[str], str]] = None,
              lines: Optional[Iterable[str]] = None) -> int:
    """Terminal chat over a ``ChatBot``: streaming answers, ``exit`` quits, ``cls`` clears the screen and the
    history. Returns the number of answered turns. ``lines`` (tests) replaces interactive input.
    """
    console = console or Console()
    it = iter(lines) if lines is not None else None
    if read is None:
        def read(prompt: str) -> str:
            if it is not None:
                try:
                    line = next(it)
                except StopIteration:
                    raise EOFError from None
                console.print(Text(prompt + line, style="bold green"))
                return line
            line = console.input(f"[bold green]{prompt}[/]")
            if not sys.stdin.isatty():  # piped input is not echoed: show it
                console.print(line, highlight=False)
            return line
    console.print(f"[bold]ChatBot[/] ({bot.model_name}, {bot.engine}, {bot.cfg.search_type}) - "
                  f"type [cyan]exit[/] to quit, [cyan]cls[/] to clear the screen and the history")
    history: list[tuple[str, str]] = []
    answered = 0
    while True:
        try:
            query = read("User: ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if not query:
            continue
        if query.lower() == "exit":
            break
        if query.lower() == "cls":
            console.clear()
            history.clear()
            console.print("[dim]screen and history cleared[/]")
            continue
        answer = ""
        # Pieces are printed as they come: a rich Live region redrawn under CJK text and input() garbles the
        # terminal. rich still styles the label and handles terminals without colour.
        console.print(Text("ChatBot: ", style="bold cyan"), end="")
        try:
            for piece in bot.stream_chat(query, history):
                answer += piece
                console.print(Text(piece), end="", soft_wrap=True)
                console.file.flush()
            console.print()
        except KeyboardInterrupt:
            console.print(" [yellow](stopped)[/]")
        except ValueError as e:
            console.print(f"[red]{e}[/]")
            continue
        history.append((query, answer))
        answered += 1
    console.print("[dim]bye[/]")
    return answered


def main(**overrides) -> None:
    console = Console()
    try:
        cfg = make_config(InferConfig, **overrides)
        from transformers.utils import logging as hf_logging

        from model.serving.infer import ChatBot  # torch and transformers load here, after --help and flag checks
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in the chat window
        with console.status(f"loading {cfg.model_dir} ..."):
            bot = ChatBot(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
        sys.exit(1)
    chat_loop(bot, console)


if __name__ == "__main__":
    run_cli(main)
