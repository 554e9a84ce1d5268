"""A progress bar on stderr for long benchmark runs (rich), or nothing.

:func:`progress` is a context manager yielding ``step(description)``: call it as each
step *starts*; the bar counts the steps finished and shows what runs now.  Disabled
(``enabled=False``, e.g. when stderr is not a terminal or for JSON output) it yields a
function that does nothing, so library code calls ``step`` unconditionally.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Step = Callable[[str], None]


def no_progress(description: str) -> None:
    """A ``step`` that reports nothing."""


@contextmanager
def progress(total: int, enabled: bool = True) -> Iterator[Step]:
    """A bar of ``total`` steps on stderr while the block runs (transient when done)."""
    if not enabled:
        yield no_progress
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("starting", total=total)
        started = 0

        def step(description: str) -> None:
            nonlocal started
            bar.update(task, description=description, completed=max(0, started))
            started += 1

        yield step
        bar.update(task, completed=total)
