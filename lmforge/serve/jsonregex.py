"""Regular expressions for JSON values that outlines-core's schema translation cannot write: number ranges,
multiples, and string patterns made safe to appear inside a JSON string.

Each function returns a regex in the syntax outlines-core compiles (Rust's `regex`), or raises
StructuredOutputError naming the keyword when the constraint has no exact regular form here. "Exact" means sound:
every text the regex matches is a JSON value that satisfies the constraint as `jsonschema` checks it (Python
numbers, Python `re.search`); the regex may match fewer texts than the constraint allows (no exponents, integers
for a range of numbers, ASCII for a negated character class), never more.
"""

from __future__ import annotations

import math
import re
import re._constants as sre
import re._parser as sre_parse
from fractions import Fraction

from lmforge.errors import LmforgeError

MAX_COUNT = 1000  # the largest repeat count (lengths, item counts, pattern quantifiers) or list of values written
# Finite bounds are written with at most this many digits: beyond it outlines-core's automaton build slows
# exponentially (measured: a 12-digit bound before a closing brace, seconds; 16 digits, minutes). A bound
# further out is moved inward to +-(10**MAX_DIGITS - 1), which only narrows the range; an unbounded side stays so.
MAX_DIGITS = 8
LIMIT = 10**MAX_DIGITS - 1


class StructuredOutputError(LmforgeError):
    """A format that cannot be enforced: a bad schema or regex, or a tokenizer the automaton cannot use; `param`
    names the request field (response_format, regex, choice)."""


class SchemaKeywordError(StructuredOutputError):
    """A schema keyword that cannot be enforced during decoding; `keyword` names it, the message says why (the
    functions here give the reason alone; lmforge.serve.schema adds where in the schema)."""

    def __init__(self, message: str, keyword: str):
        super().__init__(message, "response_format")
        self.keyword = keyword


def literal(text: str) -> str:
    """`text` matched literally (regex metacharacters escaped; everything else as itself)."""
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", text)


def alternation(options: list[str]) -> str:
    return options[0] if len(options) == 1 else "(?:" + "|".join(options) + ")"


# ---------------------------------------------------------------------------------- integers


def _digits(a: str, b: str) -> list[str]:
    """Alternatives matching every digit string of len(a) from a to b (a <= b, equal lengths)."""
    n = len(a)
    if n == 0:
        return [""]
    if a[1:] == "0" * (n - 1) and b[1:] == "9" * (n - 1):  # every tail: one class for the first digit
        first = a[0] if a[0] == b[0] else f"[{a[0]}-{b[0]}]"
        return [first + (f"[0-9]{{{n - 1}}}" if n > 2 else "[0-9]" if n == 2 else "")]
    if a[0] == b[0]:
        return [a[0] + alternation(_digits(a[1:], b[1:]))]
    out = [a[0] + alternation(_digits(a[1:], "9" * (n - 1)))]
    if int(b[0]) - int(a[0]) > 1:
        out.append(f"[{int(a[0]) + 1}-{int(b[0]) - 1}]" + (f"[0-9]{{{n - 1}}}" if n > 1 else ""))
    return out + [b[0] + alternation(_digits("0" * (n - 1), b[1:]))]


def _naturals(lo: int, hi: int | None) -> list[str]:
    """Alternatives matching the canonical decimal text of every integer in [lo, hi] (0 <= lo; hi None: no end).

    The widths whose every number is in range are one term, `[1-9][0-9]{a,b}`: besides being short, distinct
    alternatives over the same digits make outlines-core's automaton build slow (seconds for 12-digit bounds).
    """
    last = len(str(hi)) if hi is not None else None
    out, whole = [], []
    for width in range(len(str(lo)), (last or len(str(lo))) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = 10**width - 1 if hi is None else min(hi, 10**width - 1)
        if width > 1 and a == 10 ** (width - 1) and b == 10**width - 1:
            whole.append(width)
        elif a <= b:
            out += _digits(str(a), str(b))
    if hi is None:
        whole.append(None)  # and every longer number
    if whole:
        first = whole[0] - 1 if whole[0] is not None else len(str(lo))
        out.append(f"[1-9][0-9]{{{first},{'' if whole[-1] is None else whole[-1] - 1}}}")
    return out


def integers(lo: int | None, hi: int | None) -> list[str]:
    """Alternatives for the integers in [lo, hi] (None: unbounded), canonical (no leading zeros, no -0); [] if none."""
    if lo is not None and hi is not None and lo > hi:
        return []
    out = []
    if hi is None or hi >= 0:
        out += _naturals(max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:
        out += ["-" + alternation(_naturals(max(-hi, 1) if hi is not None else 1, -lo if lo is not None else None))]
    return out


def multiples(k: int, lo: int | None, hi: int | None) -> list[str]:
    """Alternatives for the multiples of k in [lo, hi]: listed when they are few, else written blockwise when k
    divides 10**t (t <= 3), since then the last t digits alone decide; refused otherwise."""
    if k == 1:
        return integers(lo, hi)
    if lo is not None and hi is not None and (hi // k) - (-(-lo // k)) + 1 <= MAX_COUNT:
        return [str(m * k) for m in range(-(-lo // k), hi // k + 1)]
    t = next((t for t in range(1, 4) if 10**t % k == 0), None)
    if t is None:
        raise SchemaKeywordError(
            f"multipleOf {k} is enforced only with minimum and maximum around at most "
            f"{MAX_COUNT} multiples, or when it divides 1000 (then the last digits decide)",
            "multipleOf",
        )
    out = []
    if hi is None or hi >= 0:
        out += _multiples_natural(k, t, max(lo, 0) if lo is not None else 0, hi)
    if lo is None or lo < 0:
        out += [
            "-"
            + alternation(
                _multiples_natural(k, t, max(-hi, 1) if hi is not None else 1, -lo if lo is not None else None)
            )
        ]
    return out


def _multiples_natural(k: int, t: int, lo: int, hi: int | None) -> list[str]:
    """Multiples of k (k divides 10**t) in [lo, hi], 0 <= lo: n = q * 10**t + r with r a multiple of k."""
    block = 10**t
    endings = alternation([f"{r:0{t}d}" for r in range(0, block, k)])
    q_lo, q_hi = -(-lo // block), None if hi is None else (hi + 1) // block - 1  # the blocks wholly inside
    q_lo = max(q_lo, 1)  # block 0 is written below: its numbers have no leading zeros
    out = []
    if hi is None or q_lo <= q_hi:
        out.append(alternation(integers(q_lo, q_hi)) + endings)
    edges = range(lo, min(hi + 1, q_lo * block) if hi is not None else q_lo * block)  # below the whole blocks
    tail = (
        range(max(lo, (q_hi + 1) * block), hi + 1) if hi is not None and q_hi is not None and q_lo <= q_hi else range(0)
    )
    if hi is not None and q_hi is not None and q_lo > q_hi:  # no whole block: every multiple is an edge
        edges = range(lo, hi + 1)
    out += [str(n) for n in (*edges, *tail) if n % k == 0]
    return out or []


# ---------------------------------------------------------------------------------- numbers


def number_range(
    kind: str, lo: Fraction | None, lo_excl: bool, hi: Fraction | None, hi_excl: bool, multiple: Fraction | None
) -> str:
    """The regex of `kind` ("integer" or "number") values within the bounds and multiple of `multiple`.

    Integers are written exactly. Numbers are integers plus fractions `I.F` whose whole unit [I, I+1] lies inside
    the bounds (a float rounds `I.999...` to I+1, never beyond; |I| <= LIMIT, where units are exact floats); no
    exponents. A multipleOf that is not an integer is refused: jsonschema checks it in binary floating point,
    where 0.07 is not a multiple of 0.01.
    """
    ilo = None if lo is None else max(-LIMIT, math.floor(lo) + 1 if lo_excl else math.ceil(lo))
    ihi = None if hi is None else min(LIMIT, math.ceil(hi) - 1 if hi_excl else math.floor(hi))
    if multiple is not None:
        if multiple.denominator != 1:
            raise SchemaKeywordError(
                f"multipleOf {float(multiple):g} is not an integer, and jsonschema checks it "
                f"in binary floating point, where decimal fractions are not exact multiples",
                "multipleOf",
            )
        return alternation(multiples(int(multiple), ilo, ihi) or _empty("multipleOf"))
    options = integers(ilo, ihi)
    if kind == "number":  # fractions of the units [I, I+1] that lie wholly inside the bounds
        ulo = max(ilo, 0) if ilo is not None else 0
        uhi = min((math.ceil(hi) - 2 if hi_excl else math.floor(hi) - 1) if hi is not None else LIMIT - 1, LIMIT - 1)
        if ulo <= uhi:
            options.append(alternation(integers(ulo, uhi)) + r"\.[0-9]+")
        # -I.F lies in [-(I+1), -I]: I+1 <= -lo (strictly when exclusive) and -I <= hi (strictly when exclusive)
        nlo = 0 if hi is None else max(0, (math.floor(-hi) + 1 if hi_excl else math.ceil(-hi)))
        nhi = min(LIMIT - 1 if lo is None else (math.ceil(-lo) - 2 if lo_excl else math.floor(-lo) - 1), LIMIT - 1)
        if nlo <= nhi:
            options.append("-" + alternation(integers(nlo, nhi)) + r"\.[0-9]+")
    return alternation(options or _empty("minimum"))


def _empty(keyword: str) -> list[str]:
    raise SchemaKeywordError(
        "no number this server writes satisfies the bounds (it writes integers, and fractions "
        "only within whole units that lie inside the bounds)",
        keyword,
    )


# ---------------------------------------------------------------------------------- string patterns

_UNSAFE = set(range(0x20)) | {ord('"'), ord("\\")}  # what a JSON string cannot hold raw
_ASCII = [c for c in range(0x20, 0x7F) if c not in _UNSAFE]
_CATEGORY = {
    sre.CATEGORY_DIGIT: r"\d",
    sre.CATEGORY_NOT_DIGIT: r"\D",
    sre.CATEGORY_WORD: r"\w",
    sre.CATEGORY_NOT_WORD: r"\W",
    sre.CATEGORY_SPACE: r"\s",
    sre.CATEGORY_NOT_SPACE: r"\S",
}


def _char(c: int) -> str:
    return chr(c) if chr(c).isalnum() and c < 0x80 else f"\\x{{{c:X}}}"


def _class(codes: set[int], ranges: list[tuple[int, int]] = ()) -> str:
    """A character class of `codes` plus non-ASCII `ranges`, none of them unsafe."""
    parts = [_char(c) for c in sorted(codes)] + [f"{_char(a)}-{_char(b)}" for a, b in ranges]
    if not parts:
        raise SchemaKeywordError(
            "it needs a character a JSON string cannot hold unescaped (a quote, backslash or "
            "control character), which this server does not write",
            "pattern",
        )
    return "[" + "".join(parts) + "]"


def _matches(items, c: int) -> bool:
    """Whether Python's regex class `items` (sre_parse IN items, possibly negated) matches chr(c)."""
    hit, negate = False, False
    for op, av in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            hit |= av == c
        elif op is sre.RANGE:
            hit |= av[0] <= c <= av[1]
        elif op is sre.CATEGORY:
            hit |= re.fullmatch(_CATEGORY[av], chr(c)) is not None
        else:
            raise SchemaKeywordError(f"the class item {op} is not supported", "pattern")
    return hit != negate


def _char_node(op, av) -> str:
    """A one-character node as a class of the characters it matches that a JSON string holds raw: all of them
    among printable ASCII (decided by Python's own regex), plus the literal non-ASCII ones of a positive class."""
    items = [(op, av)] if op is not sre.IN else av
    if op is sre.NOT_LITERAL:
        items = [(sre.NEGATE, None), (sre.LITERAL, av)]
    if op is sre.ANY:
        items = [(sre.NEGATE, None), (sre.LITERAL, ord("\n"))]
    codes = {c for c in _ASCII if _matches(items, c)}
    wide = []
    if not any(o is sre.NEGATE for o, _ in items):
        for o, a in items:
            if o is sre.LITERAL and a >= 0x80:
                codes.add(a)
            elif o is sre.RANGE and a[1] >= 0x80:
                wide.append((max(a[0], 0x80), a[1]))
    return _class(codes, wide)


def _emit(pattern, top: bool = False) -> str:
    out, items = [], list(pattern)
    for i, (op, av) in enumerate(items):
        if op in (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN):
            out.append(_char_node(op, av))
        elif op is sre.BRANCH:
            out.append("(?:" + "|".join(_emit(p) for p in av[1]) + ")")
        elif op is sre.SUBPATTERN:
            if av[1] or av[2]:
                raise SchemaKeywordError("inline flags are not supported", "pattern")
            out.append("(?:" + _emit(av[3]) + ")")
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            if lo > MAX_COUNT or (hi is not sre.MAXREPEAT and hi > MAX_COUNT):
                raise SchemaKeywordError(f"repeat counts above {MAX_COUNT} are not supported", "pattern")
            out.append("(?:" + _emit(sub) + ")" + (f"{{{lo},}}" if hi is sre.MAXREPEAT else f"{{{lo},{hi}}}"))
        elif (
            op is sre.AT
            and top
            and (
                (i == 0 and av in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING))
                or (i == len(items) - 1 and av in (sre.AT_END, sre.AT_END_STRING))
            )
        ):
            continue  # the whole string is matched anyway
        else:
            raise SchemaKeywordError(
                f"{'an anchor inside it' if op is sre.AT else str(op).lower()} cannot be "
                f"enforced; use characters, classes, groups, alternation and repeats",
                "pattern",
            )
    return "".join(out)


def string_pattern(pattern: str) -> str:
    """The regex of JSON strings (quotes included) whose content matches `pattern` whole: a subset of what
    jsonschema's `re.search(pattern, value)` accepts, holding no character a JSON string cannot hold raw."""
    try:
        parsed = sre_parse.parse(pattern)
    except re.error as e:
        raise SchemaKeywordError(f"{pattern!r} is not a valid regular expression ({e})", "pattern") from e
    if parsed.state.flags & ~(re.UNICODE | sre.SRE_FLAG_UNICODE):
        raise SchemaKeywordError("inline flags are not supported", "pattern")
    return '"' + _emit(parsed, top=True) + '"'
