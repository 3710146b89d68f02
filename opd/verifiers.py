"""Verifiers: does a completion solve a problem whose reference answer is known? One registry, one place for names.

A verifier is a function `(answer, completion) -> bool`. The built-in ones are named in `VERIFIERS`; any other
function is named by import path, `module:function` (`task.verifier: "mypkg.checks:is_correct"`), imported and
probed once when the config is loaded, so a typo or a wrong signature is refused before a run starts, not in the
first actor's reward. The actors (rewards), the learner (held-out accuracy) and the report all call `verify` with
the same name, so every process agrees on what counts as correct; a custom module must therefore be importable in
each of them (installed, or on PYTHONPATH).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

Verifier = Callable[[str, str], bool]

# A number as people and models write it: an optional sign (ASCII or Unicode minus) that is not a subtraction
# (no digit, letter, dot or closing bracket right before it), digits with or without thousands commas, an optional
# decimal part; or a bare decimal like ".5". "5-3" gives 5 and 3, "1,234.50" gives 1234.50, "1,2,3" gives 1, 2, 3.
_NUMBER = re.compile(
    r"(?:(?<![\w.)\]])(?P<sign>[-+\u2212]))?"
    r"(?P<body>\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
)
_BOXED = "\\boxed{"


def exact(answer: str, completion: str) -> bool:
    """The completion is the answer, after stripping surrounding whitespace."""
    return completion.strip() == answer.strip()


def contains(answer: str, completion: str) -> bool:
    """The answer appears somewhere in the completion."""
    return answer.strip() in completion


def numbers(text: str) -> list[Decimal]:
    """Every number in `text`, in order, as exact decimals (so 0.1 + 0.2 style float error cannot creep in)."""
    found = []
    for m in _NUMBER.finditer(text):
        body = m.group("body").replace(",", "")
        negative = m.group("sign") in ("-", "\u2212")
        try:
            value = Decimal(body)
        except InvalidOperation:  # pragma: no cover - the pattern admits only valid decimals
            continue
        found.append(-value if negative else value)
    return found


def last_number(answer: str, completion: str) -> bool:
    """The last number in the completion equals the answer's number (its last one), numerically: "-1,234.50"
    equals "-1234.5". False when either has no number (an answer without one is a data error the check can't fix)."""
    want, got = numbers(answer), numbers(completion)
    return bool(want and got) and got[-1] == want[-1]


def boxed_content(text: str) -> str | None:
    """What the last `\\boxed{...}` holds, with nested braces (`\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`);
    None when there is none or its braces never close."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def _squash(text: str) -> str:
    return " ".join(text.split())


def boxed(answer: str, completion: str) -> bool:
    """The completion's last `\\boxed{}` holds the answer (whitespace runs collapsed on both sides). An answer
    written boxed itself is compared by its content."""
    got = boxed_content(completion)
    want = boxed_content(answer)
    want = answer if want is None else want
    return got is not None and _squash(got) == _squash(want)


VERIFIERS: dict[str, Verifier] = {
    "exact": exact,
    "contains": contains,
    "last_number": last_number,
    "boxed": boxed,
}
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def check_name(name: str) -> str:
    """`name` if it is a built-in verifier or a `module:function` whose function imports, takes (answer,
    completion) and returns a bool on a probe; otherwise ValueError saying what is wrong and how to fix it."""
    resolve(name)
    return name


@functools.cache
def resolve(name: str) -> Verifier:
    """The function a verifier name means (built-in name, or `module:function` imported once per process)."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    if not _IMPORT_PATH.match(name):
        raise ValueError(
            f"{name!r} is neither a built-in verifier ({', '.join(VERIFIERS)}) nor an import path "
            "'module:function' (e.g. 'mypkg.checks:is_correct')"
        )
    module_name, attr = name.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any failure while importing user code is the user's to see, named
        raise ValueError(
            f"{name!r}: module {module_name!r} does not import ({type(exc).__name__}: {exc}); install it or put "
            "its folder on PYTHONPATH in every process that verifies"
        ) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{name!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(
            f"{name!r}: {attr!r} is a {type(fn).__name__}, not a function (answer, completion) -> bool"
        )
    _probe(name, fn)
    return fn


def _probe(name: str, fn: Verifier) -> None:
    """Call the function once on a trivial pair: its signature must take (answer, completion) and it must return
    a bool (a float or None as a reward would silently mean something else)."""
    try:
        inspect.signature(fn).bind("1", "1")
    except TypeError as exc:
        raise ValueError(f"{name!r} cannot be called as f(answer, completion): {exc}") from None
    except ValueError:  # some builtins have no signature; the probe call below still checks them
        pass
    try:
        result = fn("1", "1")
    except Exception as exc:
        raise ValueError(
            f"{name!r} raised on the probe call f('1', '1'): {type(exc).__name__}: {exc}"
        ) from None
    if type(result).__name__ not in ("bool", "bool_"):  # numpy's bool_ too
        raise ValueError(
            f"{name!r} returned {type(result).__name__} on f('1', '1'); a verifier returns a bool"
        )


def verify(answer: str | None, completion: str, name: str = "exact") -> bool:
    """True when `completion` solves a problem with reference `answer` under the named verifier; a problem without
    an answer is never solved."""
    if answer is None:
        return False
    return bool(resolve(name)(answer, completion))
