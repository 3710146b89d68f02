"""Progress of a counted long step (a model build, an evaluation, a checkpoint write): the one way to report it.

    with progress("building the teacher (SFT)", total=800, unit="steps", log=log) as bar:
        for _ in range(800):
            ...
            bar.advance()

Where it goes is decided by `log`, the callable the launcher, `opd prepare` and the components already pass around:
- `print` with a terminal on stdout, or the `print` of a rich Console that is a terminal: a rich progress bar on
  that terminal (count/total, rate, time remaining), cleared at the end and replaced by one final line;
- anything else (a component's `log.info` into its log file, a pipe, CI): a plain line through `log` at most every
  `every_s` seconds, e.g. `building the teacher (SFT): 400/800 steps, 4.6 steps/s, ETA 87 s`, and a final
  `building the teacher (SFT): done: 800 steps in 173 s (4.6 steps/s)`: never one line per step, and no carriage
  returns in a file.
`quiet_under_s` keeps an instant step silent (a tiny model's checkpoint write): nothing is shown or logged unless
it runs that long. `advance` costs one clock read and a comparison in the plain mode (the demo build runs
thousands of ~100 ms steps), a rich task update on a terminal.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.errors import LiveError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

EVERY_S = 5.0  # a plain line at most this often


def duration(seconds: float) -> str:
    """`2.4 s`, `87 s`, `14 min 05 s`, `2 h 03 min`: short enough for a status line."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 100:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _count(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def _rate(per_s: float, unit: str) -> str:
    if per_s >= 10:
        return f"{per_s:.0f} {unit}/s"
    return f"{per_s:.1f} {unit}/s" if per_s >= 1 else f"{per_s:.2g} {unit}/s"


class _RateColumn(ProgressColumn):
    """units/s from rich's own speed estimate (its recent samples), in the step's unit."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text("" if task.speed is None else _rate(task.speed, self.unit), style="progress.data.speed")


class _Plain:
    """Lines through `log`, throttled by the clock."""

    def __init__(self, description, total, unit, log, clock, every_s, quiet_under_s):
        self.description, self.total, self.unit, self.log, self.clock = description, total, unit, log, clock
        self.every_s, self.quiet_under_s = every_s, quiet_under_s
        self.done = 0.0
        self.started = clock()
        self.next_at = self.started + max(every_s, quiet_under_s)

    def advance(self, n: float = 1) -> None:
        """`n` more units done (called once per step: one clock read unless a line is due)."""
        self.done += n
        now = self.clock()
        if now >= self.next_at and not (self.total and self.done >= self.total):  # the final line says that
            self._line(now)

    def update(self, completed: float, total: float | None = None) -> None:
        """Set the count (and the total, when it turns out different from the estimate); a line if one is due."""
        if total is not None:
            self.total = total
        self.done = completed
        self.advance(0)

    def _line(self, now: float) -> None:
        self.next_at = now + self.every_s
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        shown = f"{_count(self.done)}/{_count(self.total)}" if self.total else _count(self.done)
        line = f"{self.description}: {shown} {self.unit}"
        if rate > 0:
            line += f", {_rate(rate, self.unit)}"
            if self.total:
                line += f", ETA {duration(max(0.0, self.total - self.done) / rate)}"
        self.log(line)

    def finish(self) -> None:
        elapsed = self.clock() - self.started
        if elapsed < self.quiet_under_s:
            return
        rate = f" ({_rate(self.done / elapsed, self.unit)})" if elapsed > 0 and self.done else ""
        self.log(f"{self.description}: done: {_count(self.done)} {self.unit} in {duration(elapsed)}{rate}")

    def close(self) -> None:
        """Take down what is drawn (after an error: no final line)."""


class _Bar(_Plain):
    """A rich bar on a terminal, started once the step has run `quiet_under_s`; the final line as in plain mode."""

    def __init__(self, console: Console, *args):
        super().__init__(*args)
        self.console = console
        self.bar: Progress | None = None
        self.task = None
        self.plain = False  # another live display holds the terminal: plain lines instead
        self.next_at = self.started + self.quiet_under_s  # the bar itself is its own throttle

    def _line(self, now: float) -> None:
        if self.plain:
            super()._line(now)
            return
        self.next_at = float("inf")
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(self.unit),
            _RateColumn(self.unit),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        bar = Progress(*columns, console=self.console, transient=True, get_time=self.clock)
        try:
            bar.start()
        except LiveError:  # another live display (the launcher's learner bar) owns the terminal
            self.plain = True
            self.next_at = now + self.every_s
            return
        self.bar = bar
        self.task = bar.add_task(self.description, total=self.total, completed=self.done)

    def advance(self, n: float = 1) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)
            self.done += n
        else:
            super().advance(n)

    def update(self, completed: float, total: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, total=total if total is not None else self.total)
            self.done = completed
        else:
            super().update(completed, total)

    def finish(self) -> None:
        self.close()
        super().finish()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _terminal(log: Callable[..., object]) -> Console | None:
    """The terminal `log` writes to, if it is one: `print` on a TTY stdout, or a terminal Console's `print`."""
    if log is print:
        return Console(file=sys.stdout, highlight=False) if sys.stdout.isatty() else None
    owner = getattr(log, "__self__", None)
    if isinstance(owner, Console) and getattr(log, "__name__", "") in ("print", "log"):
        return owner if owner.is_terminal else None
    return None


@contextlib.contextmanager
def progress(
    description: str,
    total: float | None,
    unit: str = "steps",
    log: Callable[..., object] | None = print,
    *,
    every_s: float | None = None,
    quiet_under_s: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[_Plain]:
    """Report a counted step: yields an object with `advance(n=1)` and `update(completed, total=None)` (`total`
    None: a count without an ETA). `log=None` reports nothing. The final line is logged only when the step ends
    normally. `every_s`: the plain lines' throttle (default EVERY_S, read at call
    time)."""
    if log is None:
        yield _Silent()
        return
    every = EVERY_S if every_s is None else every_s
    args = (description, total, unit, log, clock, every, quiet_under_s)
    console = _terminal(log)
    reporter = _Bar(console, *args) if console is not None else _Plain(*args)
    if isinstance(reporter, _Bar) and quiet_under_s <= 0:
        reporter._line(reporter.started)  # draw the bar at once, not at the first step's end
    try:
        yield reporter
    except BaseException:
        reporter.close()
        raise
    reporter.finish()


class _Silent:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, completed: float, total: float | None = None) -> None:
        pass
