"""A calculator tool: exact arithmetic on one expression, evaluated by an AST walker (never eval/exec).

`evaluate(expression) -> str` is the pure function behind the tool; tasks use it for gold answers and
SFT traces, so the tool and the answers agree by construction.

Supported: integer and decimal literals, `+ - * / // % **`, unary `+ -`, parentheses. Before parsing,
`×`→`*`, `÷`→`/`, `^`→`**`, `−`→`-`, and a trailing `=` is dropped. Arithmetic is exact (rationals,
`fractions.Fraction`; a decimal literal such as 0.1 means exactly 1/10) except for a power with a
non-integer exponent, which goes through float. Every input is bounded so that the worst allowed
expression evaluates in milliseconds; each limit breach is a `ValueError` whose message the model sees.

Results: an integral value prints as a plain integer ("178377", "-5"); any other value as a decimal
rounded to 10 significant digits without trailing zeros ("0.3333333333", "2.5"), in scientific
notation ("3.333333333e+19") outside [1e-6, 1e15).
"""

from __future__ import annotations

import ast
import math
import re
from decimal import Context, Decimal
from fractions import Fraction

from tirl.tools.base import register_tool, tool

MAX_EXPRESSION_CHARS = 200
"""Longest accepted expression (characters, before normalisation)."""
MAX_NODES = 100
"""Most syntax-tree nodes (numbers and operations; operator tokens are not counted)."""
MAX_DEPTH = 30
"""Deepest nesting of operations in the syntax tree."""
MAX_EXPONENT = 100
"""Largest accepted |exponent| of `**`."""
MAX_DIGITS = 1000
"""Most digits of the result of `**`, and of any intermediate numerator or denominator."""
SIGNIFICANT_DIGITS = 10
"""Significant digits of a non-integral result."""

_MAX_MAGNITUDE = 10**MAX_DIGITS
_REPLACEMENTS = {"×": "*", "÷": "/", "^": "**", "−": "-"}
_THOUSANDS_RE = re.compile(r"\d,\d{3}(?!\d)")

Number = Fraction | float


def evaluate(expression: str) -> str:
    """The value of an arithmetic expression, formatted (see the module docstring).

    Raises `ValueError` with a short message for anything unsupported, malformed or over a limit.
    """
    tree = _parse(expression)
    return format_number(_eval(tree.body))


def _parse(expression: str) -> ast.Expression:
    """Normalise, check the limits and parse; raises `ValueError`."""
    if not isinstance(expression, str):
        raise ValueError(f"expression must be a string, got {type(expression).__name__}")
    text = expression.strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression too long ({len(text)} characters; at most {MAX_EXPRESSION_CHARS})")
    for old, new in _REPLACEMENTS.items():
        text = text.replace(old, new)
    text = text.removesuffix("=").strip()
    if not text:
        raise ValueError("empty expression")
    if _THOUSANDS_RE.search(text):
        raise ValueError("write numbers without thousands separators, e.g. 4821 instead of 4,821")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ValueError(f"invalid syntax: {e.msg}") from None
    except (MemoryError, RecursionError):
        raise ValueError("expression too deeply nested") from None
    nodes, depth = _measure(tree.body)
    if nodes > MAX_NODES:
        raise ValueError(f"expression too large ({nodes} nodes; at most {MAX_NODES})")
    if depth > MAX_DEPTH:
        raise ValueError(f"expression too deeply nested (depth {depth}; at most {MAX_DEPTH})")
    return tree


def _measure(root: ast.AST) -> tuple[int, int]:
    """(node count, depth) of a syntax tree, operator tokens and contexts not counted."""
    count, depth, stack = 0, 0, [(root, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.expr_context)):
            continue
        count, depth = count + 1, max(depth, level)
        stack.extend((child, level + 1) for child in ast.iter_child_nodes(node))
    return count, depth


def _eval(node: ast.AST) -> Number:
    """Value of a checked syntax tree (depth already bounded, so recursion is safe)."""
    if isinstance(node, ast.Constant):
        return _literal(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _binary(node.op, _eval(node.left), _eval(node.right))
    what = type(node.op).__name__ if isinstance(node, (ast.UnaryOp, ast.BinOp)) else type(node).__name__
    raise ValueError(f"unsupported syntax: {what}")


def _literal(value: object) -> Number:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"unsupported syntax: {type(value).__name__} literal")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("number too large")
        return _checked(Fraction(repr(value)))  # the shortest repr is the literal as written: 0.1 -> 1/10
    return _checked(Fraction(value))


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    try:
        if isinstance(op, ast.Pow):
            return _checked(_power(left, right))
        return _checked(_BINARY[type(op)](left, right))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("number too large") from None


_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: None,  # handled by _power
}


def _power(base: Number, exponent: Number) -> Number:
    """`base ** exponent`, refusing exponents over MAX_EXPONENT and results over MAX_DIGITS digits."""
    if abs(exponent) > MAX_EXPONENT:
        raise ValueError(f"exponent too large (|exponent| must be at most {MAX_EXPONENT})")
    if base == 0:
        if exponent < 0:
            raise ZeroDivisionError
        return Fraction(1) if exponent == 0 else Fraction(0)
    if base < 0 and exponent != math.floor(exponent):
        raise ValueError("a negative number cannot be raised to a non-integer power")
    exact = isinstance(base, Fraction) and isinstance(exponent, Fraction) and exponent.denominator == 1
    # digits of the result: of its numerator and denominator when exact, of its value otherwise
    scale = math.log10(max(abs(base.numerator), base.denominator)) if exact else abs(_log10(base))
    if abs(exponent) * scale >= MAX_DIGITS:
        raise ValueError(f"result too large (more than {MAX_DIGITS} digits)")
    if exact:
        return base ** int(exponent)
    return math.pow(float(base), float(exponent))


def _log10(x: Number) -> float:
    """log10(|x|) for a non-zero number, without converting huge or tiny rationals to float."""
    if isinstance(x, Fraction):
        return math.log10(abs(x.numerator)) - math.log10(x.denominator)
    return math.log10(abs(x))


def _checked(value: Number) -> Number:
    """`value`, unless it exceeds the magnitude limits (or is not a finite float)."""
    if isinstance(value, int):  # `//` on rationals returns int
        value = Fraction(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("number too large")
    elif abs(value.numerator) > _MAX_MAGNITUDE or value.denominator > _MAX_MAGNITUDE:
        raise ValueError(f"number too large (more than {MAX_DIGITS} digits)")
    return value


def format_number(value: Number) -> str:
    """An integral value as a plain integer; otherwise 10 significant digits, no trailing zeros."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return str(value.numerator)
    context = Context(prec=SIGNIFICANT_DIGITS)
    if isinstance(value, Fraction):
        rounded = context.divide(Decimal(value.numerator), Decimal(value.denominator))
    else:
        rounded = context.plus(Decimal(value))
    if rounded.is_zero():
        return "0"
    rounded = rounded.normalize(context)
    if -6 <= rounded.adjusted() < 15:
        return format(rounded, "f")
    return format(rounded, "e")


@register_tool
@tool(name="calculator")
async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly.

    Args:
        expression: The expression to evaluate, written with numbers, + - * / // % ** and parentheses.
    """
    return evaluate(expression)
