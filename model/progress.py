"""Progress bars: one look for every stage (rich), and a no-op when the bar is switched off."""
from __future__ import annotations

from typing import Iterator, Sequence, TypeVar

from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn)

T = TypeVar("T")


def progress_bar(bytes_done: bool = False, info: bool = False, transient: bool = False,
                 disable: bool = False) -> Progress:
    """A rich ``Progress``: the task's description, a bar, ``done/total`` (or bytes with ``bytes_done``) and the
    time left; ``info`` adds the task field ``info`` (e.g. the latest loss) at the end."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(),
               DownloadColumn() if bytes_done else MofNCompleteColumn(), TimeRemainingColumn()]
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    return Progress(*columns, transient=transient, disable=disable)


def track(items: Sequence[T], desc: str, enabled: bool = True) -> Iterator[T]:
    """Iterate over ``items`` behind a bar that disappears when done (plain iteration when not ``enabled``)."""
    if not enabled:
        yield from items
        return
    with progress_bar(transient=True) as prog:
        task = prog.add_task(desc, total=len(items))
        for it in items:
            yield it
            prog.advance(task)
