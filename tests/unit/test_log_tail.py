"""The end of a dead component's log the launcher prints: the real error, not a repeated warning."""

from __future__ import annotations

from opd.launch.supervisor import log_tail


def test_a_repeated_warning_is_folded_and_the_traceback_shown_whole():
    warning = "FutureWarning: past_key_values is deprecated"
    traceback = ["Traceback (most recent call last):", *[f'  File "x.py", line {i}' for i in range(30)]]
    lines = ["starting", *[warning] * 500, *traceback, "RuntimeError: teacher tokenizer differs"]
    shown = log_tail(lines).splitlines()
    assert shown.count(warning) == 1 and "  (the line above 499 more times)" in shown
    assert shown[-1] == "RuntimeError: teacher tokenizer differs"
    assert "Traceback (most recent call last):" in shown  # 32 lines: more than the plain tail of 25


def test_without_a_traceback_the_last_lines():
    lines = [f"line {i}" for i in range(100)]
    assert log_tail(lines, 5).splitlines() == [f"line {i}" for i in range(95, 100)]
