"""Terminal output of the CLI's sweeps and benchmarks: progress bars and tables.

Both go through `rich <https://rich.readthedocs.io>`_ (the ``cli`` extra: ``pip install
mooncake[cli]``).  Without it installed, a plain fallback prints the same information: one
progress line per update (rewritten in place on a terminal) and an aligned text table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

__all__ = ["Progress", "print_table", "have_rich"]


def have_rich() -> bool:
    """Whether rich is importable (the ``cli`` extra is installed)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


class Progress:
    """A progress bar on stderr over ``total`` steps (points of a sweep, seconds of a run).

    ``update(completed, status)`` moves it and sets the text after the bar.  ``seconds``:
    the steps are seconds (shown as ``1.5/2 s``), else a count (``3/8``).  Disabled, it prints
    nothing.  Use as a context manager.
    """

    def __init__(self, total: float, description: str, enabled: bool = True,
                 stream: TextIO | None = None, seconds: bool = False) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self.seconds = seconds
        self.stream = stream or sys.stderr
        self._rich: Any = None
        self._task: Any = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def __enter__(self) -> Progress:
        if not self.enabled:
            return self
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import Progress as RichProgress
        except ImportError:
            return self
        count = (TextColumn("{task.completed:.1f}/{task.total:g} s") if self.seconds
                 else MofNCompleteColumn())
        cols = [TextColumn("{task.description}"), BarColumn(), count]
        cols += [] if self.seconds else [TimeElapsedColumn()]
        self._rich = RichProgress(*cols, TextColumn("{task.fields[status]}"),
                                  console=Console(file=self.stream,
                                                  width=None if self._tty else 120),
                                  transient=False)
        self._rich.start()
        self._task = self._rich.add_task(self.description, total=self.total, status="")
        return self

    @property
    def uses_rich(self) -> bool:
        """Drawn by rich (else plain lines, or nothing when disabled)."""
        return self._rich is not None

    def update(self, completed: float, status: str = "") -> None:
        """Show ``completed`` of ``total`` and ``status``."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.update(self._task, completed=min(completed, self.total), status=status)
            return
        done = (f"{min(completed, self.total):5.1f}/{self.total:g} s" if self.seconds
                else f"{completed:g}/{self.total:g}")
        msg = f"{self.description} {done}  {status}".rstrip()
        if self._tty:
            self.stream.write("\r" + msg.ljust(self._width))
            self._width = len(msg)
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled and self._tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], title: str = "",
                highlight: int | None = None, stream: TextIO | None = None) -> None:
    """Print ``rows`` under ``columns`` (numbers right-aligned), the row ``highlight`` marked:
    a rich table when rich is installed, else aligned text with ``*`` before that row."""
    stream = stream or sys.stdout
    numeric = [all(_numeric(r[i]) for r in rows) for i in range(len(columns))]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        cells = [list(columns)] + [list(r) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
        if title:
            stream.write(title + "\n")
        for n, c in enumerate(cells):
            mark = "* " if highlight is not None and n - 1 == highlight else "  "
            text = "  ".join(v.rjust(w) if numeric[i] and n else v.ljust(w)
                             for i, (v, w) in enumerate(zip(c, widths, strict=True)))
            stream.write((mark + text).rstrip() + "\n")
        stream.flush()
        return
    tty = bool(getattr(stream, "isatty", lambda: False)())
    console = Console(file=stream, width=None if tty else 200)
    if title:
        console.print(title, highlight=False, soft_wrap=True)
    t = Table()
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if numeric[i] else "left", no_wrap=True)
    for n, r in enumerate(rows):
        t.add_row(*r, style="bold green" if n == highlight else None)
    console.print(t)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", "").rstrip("*"))
    except ValueError:
        return False
    return True
