"""`opd.runtime.progress`: throttled plain lines with rate and ETA off a terminal, a rich bar on one.

Time is injected (the module takes a clock), so these run in milliseconds and their numbers are exact."""

from __future__ import annotations

import re
import time
from io import StringIO

from rich.console import Console

from learner.checkpoint import CheckpointStore, watched_write
from opd.runtime.progress import duration, progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_are_throttled_and_carry_rate_and_eta():
    clock, lines = Clock(), []
    with progress("building the teacher (SFT)", 800, "steps", lines.append, clock=clock) as bar:
        for _ in range(800):
            clock.now += 0.25  # 4 steps/s: 200 s in all
            bar.advance()
    # one line per 5 s of work and a final one, not 800
    assert 35 <= len(lines) <= 41, lines
    assert lines[0] == "building the teacher (SFT): 20/800 steps, 4.0 steps/s, ETA 3 min 15 s"
    assert lines[-1] == "building the teacher (SFT): done: 800 steps in 3 min 20 s (4.0 steps/s)"
    assert all("ETA" in line and "steps/s" in line for line in lines[:-1])
    assert not any("\r" in line for line in lines)


def test_a_quick_step_under_quiet_under_s_logs_nothing_and_a_slow_one_a_final_line():
    clock, lines = Clock(), []
    with progress("writing checkpoint", 10, "MB", lines.append, quiet_under_s=2.0, clock=clock) as bar:
        clock.now += 0.5
        bar.update(10)
    assert lines == []
    with progress("writing checkpoint", 10, "MB", lines.append, quiet_under_s=2.0, clock=clock) as bar:
        clock.now += 4.0
        bar.update(10)
    assert lines == ["writing checkpoint: done: 10 MB in 4.0 s (2.5 MB/s)"]


def test_no_final_line_when_the_step_fails():
    clock, lines = Clock(), []
    try:
        with progress("evaluating", 4, "problems", lines.append, clock=clock) as bar:
            bar.advance()
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert not any("done" in line for line in lines)


def test_a_terminal_gets_a_rich_bar_with_count_rate_and_time_remaining():
    clock, buf = Clock(), StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with progress("evaluating the teacher", 8, "problems", console.print, clock=clock) as bar:
        for i in range(8):
            clock.now += 0.5
            bar.advance()
            if i == 3:  # halfway: wait for the bar's refresh thread to draw a frame
                deadline = time.monotonic() + 10
                while "4/8" not in buf.getvalue() and time.monotonic() < deadline:
                    time.sleep(0.02)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())  # the text, without colours and cursor moves
    frame = next(f for f in out.split("\r") if "4/8" in f)
    assert "━" in frame  # the bar itself
    assert "2.0 problems/s" in frame
    assert "ETA" in frame and "0:00:02" in frame  # 4 problems left at 2/s
    assert "evaluating the teacher: done: 8 problems in 4.0 s" in out


def test_a_console_that_is_not_a_terminal_gets_plain_lines():
    clock, buf = Clock(), StringIO()
    console = Console(file=buf, width=200)  # a file: what the launcher's console is when piped
    with progress("evaluating", 100, "problems", console.print, clock=clock, every_s=1.0) as bar:
        for _ in range(10):
            clock.now += 0.5
            bar.advance(10)
    out = buf.getvalue()
    assert "\r" not in out and "━" not in out
    assert "evaluating: 20/100 problems, 20 problems/s, ETA 4.0 s" in out
    assert out.strip().splitlines()[-1] == "evaluating: done: 100 problems in 5.0 s (20 problems/s)"


def test_durations_read_as_words():
    assert [duration(s) for s in (2.44, 87, 845, 7380)] == ["2.4 s", "87 s", "14 min 05 s", "2 h 03 min"]


def test_checkpoint_write_progress_in_megabytes_against_the_previous_size(tmp_path):
    lines = []
    tmp = tmp_path / "w"
    tmp.mkdir()
    with watched_write(tmp, "checkpoint step-000002", 3_000_000, lines.append, poll_s=0.05, quiet_s=0.1):
        for i in range(3):
            (tmp / f"part{i}").write_bytes(b"\0" * 1_000_000)
            time.sleep(0.2)
    assert any("/3 MB" in line and "MB/s" in line and "ETA" in line for line in lines[:-1]), lines
    assert lines[-1].startswith("writing checkpoint step-000002: done: 3 MB in "), lines


def test_a_tiny_checkpoint_write_logs_nothing(tmp_path):
    lines = []
    store = CheckpointStore(tmp_path, keep=2, log=lines.append)
    path = store.save(1, lambda d: (d / "state.json").write_text("{}"))
    assert (path / "state.json").is_file()
    assert lines == []


def test_a_step_under_another_live_bar_still_reports():
    """The launcher's learner bar is a live display too: rich 13 refuses a second one on a console (this module
    then falls back to plain lines), later versions nest it; either way the step runs and says it is done."""
    from rich.progress import Progress  # noqa: PLC0415

    clock, buf = Clock(), StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with Progress(console=console, auto_refresh=False):
        with progress("evaluating", 4, "problems", console.print, clock=clock, every_s=1.0) as bar:
            for _ in range(4):
                clock.now += 1.0
                bar.advance()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "evaluating: done: 4 problems in 4.0 s (1.0 problems/s)" in out, out
