"""Tests for tirl.tools.calculator: values, formatting, every limit and refused syntax, speed."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tirl.tools import TOOLS, ToolSet, calculator, evaluate
from tirl.tools.calculator import MAX_DEPTH, MAX_EXPRESSION_CHARS, MAX_NODES
from tirl.types import ToolCall, ToolStatus


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("4821*37", "178377"),
        ("4821 * 37", "178377"),
        ("(482 + 1937) * 24", "58056"),
        ("7/2", "3.5"),
        ("10/2", "5"),
        ("2**10", "1024"),
        ("-(3-5)", "2"),
        ("3 - 8", "-5"),
        ("1/3", "0.3333333333"),
        ("2/3", "0.6666666667"),
        ("((2 + 3) * (4 - (1 + 1))) / ((5))", "2"),
        ("+4 - -2", "6"),
        ("7 // 2", "3"),
        ("-7 // 2", "-4"),
        ("-7 % 3", "2"),
        ("7.5 % 2", "1.5"),
        ("2**-2", "0.25"),
        ("-2**2", "-4"),
        ("0.1 + 0.2", "0.3"),
        ("0.1 * 3 - 0.3", "0"),
        ("1.5e3 / 4", "375"),
        ("3 * (1/3)", "1"),
        ("2**0.5", "1.414213562"),
        ("4**0.5", "2"),
        ("(-2)**2.0", "4"),
        ("10**20 / 3", "3.333333333e+19"),
        ("1/10**7", "1e-7"),
        ("1/10**6", "0.000001"),
        ("123456789012345678901234567890 + 1", "123456789012345678901234567891"),
        ("(9**100)**10 // ((9**100)**9 * 9**99)", "9"),
        ("0**0", "1"),
    ],
)
def test_values(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression, expected",
    [
        ("2 × 3", "6"), ("7 ÷ 2", "3.5"), ("2^10", "1024"), ("5 − 7", "-2"),
        ("4821 * 37 =", "178377"), (" 1+1= ", "2"),
    ],
)
def test_normalisation(expression, expected):
    assert evaluate(expression) == expected


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os')", "unsupported syntax: Call"),
        ("__import__('os').system('ls')", "unsupported syntax: Call"),
        ("a+1", "unsupported syntax: Name"),
        ("(1).real", "unsupported syntax: Attribute"),
        ('"x"*9', "unsupported syntax: str literal"),
        ("True + 1", "unsupported syntax: bool literal"),
        ("1j * 2", "unsupported syntax: complex literal"),
        ("1 < 2", "unsupported syntax: Compare"),
        ("not 1", "unsupported syntax: Not"),
        ("~1", "unsupported syntax: Invert"),
        ("1 << 3", "unsupported syntax: LShift"),
        ("1 if 1 else 2", "unsupported syntax: IfExp"),
        ("[1, 2]", "unsupported syntax: List"),
        ("1, 2", "unsupported syntax: Tuple"),
        ("lambda: 1", "unsupported syntax: Lambda"),
        ("(x := 1)", "unsupported syntax: NamedExpr"),
        ("3x4", "invalid syntax"),
        ("1 +", "invalid syntax"),
        ("import os", "invalid syntax"),
        ("", "empty expression"),
        ("=", "empty expression"),
    ],
)
def test_refused_syntax(expression, message):
    with pytest.raises(ValueError) as info:
        evaluate(expression)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("2**10**10", "exponent too large (|exponent| must be at most 100)"),
        ("9**9**9", "exponent too large (|exponent| must be at most 100)"),
        ("2**101", "exponent too large"),
        ("2**-101", "exponent too large"),
        ("2**100.5", "exponent too large"),
        ("(9**100)**11", "result too large (more than 1000 digits)"),
        ("(10**100)**10", "result too large (more than 1000 digits)"),
        ("((10**99+1)/10**99)**11", "result too large (more than 1000 digits)"),
        ("1.5**100 ** 1.5", "exponent too large"),
        ("(9**100)**10 * (9**100)**10", "number too large (more than 1000 digits)"),
        ("1/(9**100)**10/(9**100)**10", "number too large (more than 1000 digits)"),
        ("1e300 * 1e10**0.5 * 1e10**0.5", "number too large"),  # float overflow
        ("1e400", "number too large"),
        ("1/0", "division by zero"),
        ("1 // (2 - 2)", "division by zero"),
        ("5 % 0", "division by zero"),
        ("1.5 / 0.0", "division by zero"),
        ("0**-1", "division by zero"),
        ("(-8)**(1/3)", "a negative number cannot be raised to a non-integer power"),
        ("4,821*37", "write numbers without thousands separators, e.g. 4821 instead of 4,821"),
        ("1,234,567 + 1", "write numbers without thousands separators"),
    ],
)
def test_limits_and_errors(expression, message):
    with pytest.raises(ValueError) as info:
        evaluate(expression)
    assert str(info.value).startswith(message)


def test_length_limit():
    at_limit = "+".join(["1"] * 20).ljust(MAX_EXPRESSION_CHARS)  # trailing spaces are stripped
    assert evaluate(at_limit) == "20"
    longest = "1" * MAX_EXPRESSION_CHARS
    assert evaluate(longest) == longest
    with pytest.raises(ValueError, match=r"expression too long \(201 characters; at most 200\)"):
        evaluate("1" * (MAX_EXPRESSION_CHARS + 1))


def _nested_negations(depth: int) -> str:
    return "-(" * depth + "1" + ")" * depth  # depth UnaryOps around a constant: tree depth depth + 1


def test_depth_limit():
    assert evaluate(_nested_negations(MAX_DEPTH - 1)) == ("-1" if (MAX_DEPTH - 1) % 2 else "1")
    with pytest.raises(ValueError, match=r"too deeply nested \(depth 31; at most 30\)"):
        evaluate(_nested_negations(MAX_DEPTH))
    with pytest.raises(ValueError, match="too deeply nested"):
        evaluate("+".join(["1"] * 40))  # a left-leaning chain of 39 additions


def test_parentheses_alone_do_not_count_as_nesting():
    assert evaluate("(" * 60 + "7" + ")" * 60) == "7"


def test_node_limit():
    group = "(" + "+".join(["1"] * 8) + ")"  # 15 nodes, depth 8
    within = "*".join([group] * 6)  # 6 * 15 + 5 = 95 nodes
    assert evaluate(within) == str(8**6)
    with pytest.raises(ValueError, match=rf"expression too large \(111 nodes; at most {MAX_NODES}\)"):
        evaluate("*".join([group] * 7))


def test_worst_allowed_inputs_are_fast():
    worst = [
        "(9**100)**10 // 7**99 % 10**99 + (9**100)**10",
        "1/(7**100)**4 + 1/(11**95)**3 - 1/(13**89)**2",
        "(9**100)**10/(7**100)**5 * (3**100)**2 / (5**99)**3",
        "(2**0.5)**100 * 1.0000001**99 / 3**0.7",
        _nested_negations(MAX_DEPTH - 1),
        "*".join(["(" + "+".join(["9**99"] * 3) + ")"] * 6),
        "2**10**10",
        "9**9**9**9",
        "1" * MAX_EXPRESSION_CHARS,
    ]
    for expression in worst:
        started = time.perf_counter()
        try:
            evaluate(expression)
        except ValueError:
            pass
        assert time.perf_counter() - started < 0.1, expression


# --- property tests ----------------------------------------------------------------------------------

_leaves = st.integers(min_value=-(10**6), max_value=10**6).map(lambda n: (str(n) if n >= 0 else f"({n})", n))


def _combine(children):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    return st.tuples(st.sampled_from(sorted(ops)), children, children).map(
        lambda t: (f"({t[1][0]} {t[0]} {t[2][0]})", ops[t[0]](t[1][1], t[2][1]))
    )


_trees = st.recursive(_leaves, _combine, max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(_trees)
def test_integer_expressions_match_python_ints(tree):
    text, value = tree
    assert len(text) <= MAX_EXPRESSION_CHARS
    assert evaluate(text) == str(value)


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**12), 10**12), st.integers(-(10**6), 10**6).filter(bool))
def test_floor_division_and_modulo_match_python(a, b):
    assert evaluate(f"({a}) // ({b})") == str(a // b)
    assert evaluate(f"({a}) % ({b})") == str(a % b)


# --- the tool ----------------------------------------------------------------------------------------


def test_calculator_tool():
    assert TOOLS.get("calculator") is calculator
    assert calculator.description == "Evaluate an arithmetic expression exactly."
    assert calculator.parameters["required"] == ["expression"]
    assert "parentheses" in calculator.parameters["properties"]["expression"]["description"]

    tools = ToolSet([calculator])

    async def main():
        return await asyncio.gather(
            tools.execute(ToolCall(id="a", name="calculator", arguments={"expression": "4821 * 37"})),
            tools.execute(ToolCall(id="b", name="calculator", arguments={"expression": "1/0"})),
            tools.execute(ToolCall(id="c", name="calculator", arguments={"expression": 12})),
        )

    ok, failed, invalid = asyncio.run(main())
    assert (ok.status, ok.content) == (ToolStatus.OK, "178377")
    assert (failed.status, failed.content) == (ToolStatus.EXECUTION_ERROR, "Error: ValueError: division by zero")
    assert invalid.status is ToolStatus.VALIDATION_ERROR
    assert invalid.content == (
        "Error: invalid arguments for calculator: expression: Input should be a valid string (got int 12)"
    )
