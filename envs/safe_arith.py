"""Bounded arithmetic evaluator for Countdown answers: never eval, never raises, linear time.

GRPO-Zero (`countdown_task.py: answer_reward_function`) checks the answer against
`^[0-9+\\-*/() ]+$` and then calls `eval`. This module computes the same value without eval,
on Python's grammar restricted to that character set:

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := ('+' | '-') factor | NUMBER | '(' expr ')'

`**` and `//` are thus syntax errors (an operator where a factor is expected): eval would compute
`9**9**9` for minutes. As in Python 3, an integer literal with a leading zero ("07") is an error
while "0" and "00" are not. Whitespace only separates tokens ("1 2" is an error, as in eval).

`lenient=True` widens the set to TinyZero's `^[\\d+\\-*/().\\s]+$` restricted to ASCII: decimal
literals ("1.5", "1.", ".5") and the ASCII whitespace " \\t\\n\\r\\f\\v".

Bounds; anything beyond them, like division by zero or a syntax error, gives None:
  * MAX_CHARS characters, MAX_TOKENS tokens, MAX_DEPTH nested parentheses plus unary signs,
  * MAX_LITERAL_DIGITS digits per literal, |value| <= MAX_MAGNITUDE for every intermediate.
Values are floats. Every intermediate stays below 2^53, so integer +, -, * are exact and a / b is
the correctly rounded quotient, the float Python's int / int gives: within the bounds the result
is bit-identical to eval's.
"""
from __future__ import annotations

MAX_CHARS = 200
MAX_TOKENS = 100
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 9
MAX_MAGNITUDE = 1e15  # < 2^53 ~ 9.007e15, so integer arithmetic in floats is exact.

STRICT_SPACE = " "  # GRPO-Zero's character class has only the space.
LENIENT_SPACE = " \t\n\r\f\v"
_OPS = "+-*/()"


class _Invalid(Exception):
    """Internal: the expression is outside the grammar or the bounds."""


def _digit(c: str) -> bool:
    return "0" <= c <= "9"  # ASCII only: str.isdigit accepts e.g. Arabic-Indic digits, eval does not.


def _literal(lit: str) -> float:
    """Value of one literal (ASCII digits and dots), raising _Invalid where Python's tokenizer would fail."""
    dots = lit.count(".")
    if dots > 1 or lit == "." or len(lit) - dots > MAX_LITERAL_DIGITS:
        raise _Invalid
    if not dots and len(lit) > 1 and lit[0] == "0" and lit.strip("0"):
        raise _Invalid  # "07": leading zeros in decimal integer literals are a SyntaxError
    return float(lit)


def _tokenize(s: str, lenient: bool) -> list:
    """Floats for literals, one-character strings for operators and parentheses."""
    space = LENIENT_SPACE if lenient else STRICT_SPACE
    toks: list = []
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if c in space:
            i += 1
            continue
        if c in _OPS:
            toks.append(c)
            i += 1
        elif _digit(c) or (lenient and c == "."):
            j = i + 1
            while j < n and (_digit(s[j]) or (lenient and s[j] == ".")):
                j += 1
            toks.append(_literal(s[i:j]))
            i = j
        else:
            raise _Invalid
        if len(toks) > MAX_TOKENS:
            raise _Invalid
    return toks


def _bounded(v: float) -> float:
    if not -MAX_MAGNITUDE <= v <= MAX_MAGNITUDE:
        raise _Invalid
    return v


def _expr(t: list, i: int, depth: int) -> tuple[float, int]:
    v, i = _term(t, i, depth)
    while i < len(t) and (t[i] == "+" or t[i] == "-"):
        op = t[i]
        w, i = _term(t, i + 1, depth)
        v = _bounded(v + w if op == "+" else v - w)
    return v, i


def _term(t: list, i: int, depth: int) -> tuple[float, int]:
    v, i = _factor(t, i, depth)
    while i < len(t) and (t[i] == "*" or t[i] == "/"):
        op = t[i]
        w, i = _factor(t, i + 1, depth)
        if op == "*":
            v = _bounded(v * w)
        elif w == 0:
            raise _Invalid  # ZeroDivisionError under eval
        else:
            v = _bounded(v / w)
    return v, i


def _factor(t: list, i: int, depth: int) -> tuple[float, int]:
    if depth > MAX_DEPTH or i >= len(t):
        raise _Invalid
    tok = t[i]
    if tok == "+" or tok == "-":
        v, i = _factor(t, i + 1, depth + 1)
        return (v if tok == "+" else -v), i
    if tok == "(":
        v, i = _expr(t, i + 1, depth + 1)
        if i >= len(t) or t[i] != ")":
            raise _Invalid
        return v, i + 1
    if isinstance(tok, float):
        return tok, i + 1
    raise _Invalid  # ")", or "*" / "/" where a factor belongs ("**", "//", "*3")


def evaluate(expr: str, *, lenient: bool = False) -> float | None:
    """The value of an arithmetic expression, or None if it is invalid or out of bounds. Never raises."""
    if not isinstance(expr, str) or len(expr) > MAX_CHARS:
        return None
    try:
        toks = _tokenize(expr, lenient)
        v, i = _expr(toks, 0, 0)
    except (_Invalid, RecursionError):  # RecursionError cannot happen at MAX_DEPTH = 32; belt and braces
        return None
    return v if i == len(toks) else None
