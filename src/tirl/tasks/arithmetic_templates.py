"""Question generators of the arithmetic task: expression trees, operand samplers, templates.

Every question is built from an expression tree (`Num`, `BinOp`) whose value is computed exactly
(`evaluate`) and whose ASCII rendering (`render`) is the calculator call that solves it, so the
question, the gold answer and the reference call cannot disagree. Levels:

1. two-operand expressions ("What is 4821 * 37?");
2. three-operand expressions with precedence or parentheses ("Compute (482 + 1937) × 24.");
3. one operation written in words ("Multiply 2345 by 67.", "Subtract 739 from 8102."), sometimes
   after an irrelevant lead-in sentence with one number ("Leo has 12 apples. What is 3021 plus 4455?");
4. one-operation word problems, sometimes with an irrelevant number;
5. two-operation word problems, often with an irrelevant number.

Level 3 is the bridge from symbols to words: a model cold-started on "What is {a} {op} {b}?" already
solves it some of the time, so RL gets a reward signal there, while a small model almost never
solves a level-4/5 word problem straight after the cold start.

Operand sizes follow `OperandRanges` (for `max_digits=4`: sums of 3-4 digit numbers, products of
a 3-4 digit by a 2-3 digit number, exact division by a 2-digit number). Every value is a positive
integer; division is built as a = b * q.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Num:
    """A literal non-negative integer."""

    value: int
    """The number."""


@dataclass(frozen=True)
class BinOp:
    """A binary operation on two sub-expressions."""

    op: str
    """One of + - * / (ASCII)."""
    left: Expr
    """Left operand."""
    right: Expr
    """Right operand."""


Expr = Num | BinOp
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
ASCII_SYMBOLS = {"+": "+", "-": "-", "*": "*", "/": "/"}
"""How operators are written in calculator expressions (and in ASCII questions)."""
PRETTY_SYMBOLS = {"+": "+", "-": "-", "*": "×", "/": "÷"}
"""The typeset alternative some questions use."""


def render(expr: Expr, symbols: dict[str, str] = ASCII_SYMBOLS) -> str:
    """The expression as text, spaces around operators, with only the parentheses it needs."""
    if isinstance(expr, Num):
        return str(expr.value)
    prec = _PRECEDENCE[expr.op]
    left, right = render(expr.left, symbols), render(expr.right, symbols)
    if isinstance(expr.left, BinOp) and _PRECEDENCE[expr.left.op] < prec:
        left = f"({left})"
    if isinstance(expr.right, BinOp) and (
        _PRECEDENCE[expr.right.op] < prec or (_PRECEDENCE[expr.right.op] == prec and expr.op in "-/")
    ):
        right = f"({right})"
    return f"{left} {symbols[expr.op]} {right}"


def evaluate(expr: Expr) -> Fraction:
    """The exact value of the expression (true division)."""
    if isinstance(expr, Num):
        return Fraction(expr.value)
    left, right = evaluate(expr.left), evaluate(expr.right)
    if expr.op == "+":
        return left + right
    if expr.op == "-":
        return left - right
    if expr.op == "*":
        return left * right
    return left / right


@dataclass(frozen=True)
class OperandRanges:
    """Inclusive ranges operands are drawn from, derived from `max_digits` (D)."""

    big: tuple[int, int]
    """Summands, minuends, dividends, large factors: D-1 to D digits."""
    small: tuple[int, int]
    """Small factors: 2 to D-1 digits."""
    divisor: tuple[int, int]
    """Divisors and the factors of a subtracted product: 2 digits."""

    @classmethod
    def for_digits(cls, max_digits: int) -> OperandRanges:
        """Ranges for operands of at most `max_digits` digits (max_digits >= 3)."""
        return cls(big=(10 ** (max_digits - 2), 10**max_digits - 1), small=(10, 10 ** (max_digits - 1) - 1),
                   divisor=(10, 99))


Values = dict[str, int]
Sampler = Callable[[random.Random, OperandRanges], Values]


def _draw(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(bounds[0], bounds[1])


def _distinct_pair(rng: random.Random, r: OperandRanges) -> tuple[int, int]:
    """Two different big numbers, larger first."""
    while True:
        a, b = _draw(rng, r.big), _draw(rng, r.big)
        if a != b:
            return max(a, b), min(a, b)


def _exact_quotient(rng: random.Random, r: OperandRanges) -> tuple[int, int]:
    """(dividend, divisor) with a big dividend that the divisor divides, quotient >= 2."""
    b = _draw(rng, r.divisor)
    q = rng.randint(max(2, -(-r.big[0] // b)), r.big[1] // b)
    return b * q, b


def _s_add(rng: random.Random, r: OperandRanges) -> Values:
    return {"a": _draw(rng, r.big), "b": _draw(rng, r.big)}


def _s_sub(rng: random.Random, r: OperandRanges) -> Values:
    a, b = _distinct_pair(rng, r)
    return {"a": a, "b": b}


def _s_mul(rng: random.Random, r: OperandRanges) -> Values:
    return {"a": _draw(rng, r.big), "b": _draw(rng, r.small)}


def _s_div(rng: random.Random, r: OperandRanges) -> Values:
    a, b = _exact_quotient(rng, r)
    return {"a": a, "b": b}


def _s_add_then_mul(rng: random.Random, r: OperandRanges) -> Values:
    return {"a": _draw(rng, r.big), "b": _draw(rng, r.big), "c": _draw(rng, r.small)}


def _s_sub_then_mul(rng: random.Random, r: OperandRanges) -> Values:
    a, b = _distinct_pair(rng, r)
    return {"a": a, "b": b, "c": _draw(rng, r.small)}


def _s_mul_then_add(rng: random.Random, r: OperandRanges) -> Values:
    return {"a": _draw(rng, r.big), "b": _draw(rng, r.small), "c": _draw(rng, r.big)}


def _s_mul_then_sub(rng: random.Random, r: OperandRanges) -> Values:
    a, b = _draw(rng, r.big), _draw(rng, r.small)
    return {"a": a, "b": b, "c": rng.randint(r.big[0], min(r.big[1], a * b - 1))}


def _s_add_product(rng: random.Random, r: OperandRanges) -> Values:
    return {"a": _draw(rng, r.big), "b": _draw(rng, r.divisor), "c": _draw(rng, r.divisor)}


def _s_sub_product(rng: random.Random, r: OperandRanges) -> Values:
    while True:
        b, c = _draw(rng, r.divisor), _draw(rng, r.divisor)
        if b * c < r.big[1]:
            return {"a": rng.randint(max(r.big[0], b * c + 1), r.big[1]), "b": b, "c": c}


def _s_sum_then_div(rng: random.Random, r: OperandRanges) -> Values:
    lo, hi = r.big
    c = _draw(rng, r.divisor)
    total = c * rng.randint(max(2, -(-2 * lo // c)), 2 * hi // c)
    a = rng.randint(max(lo, total - hi), min(hi, total - lo))
    return {"a": a, "b": total - a, "c": c}


def _s_diff_then_div(rng: random.Random, r: OperandRanges) -> Values:
    lo, hi = r.big
    c = _draw(rng, r.divisor)
    diff = c * rng.randint(2, (hi - lo) // c)
    b = rng.randint(lo, hi - diff)
    return {"a": b + diff, "b": b, "c": c}


def _s_div_then_add(rng: random.Random, r: OperandRanges) -> Values:
    a, b = _exact_quotient(rng, r)
    return {"a": a, "b": b, "c": _draw(rng, r.small)}


def _op(op: str, left: Expr | str, right: Expr | str) -> Callable[[Values], Expr]:
    """A builder of `left op right` where a str names an operand (a, b, c)."""

    def leaf(x: Expr | str, v: Values) -> Expr:
        return Num(v[x]) if isinstance(x, str) else x

    return lambda v: BinOp(op, leaf(left, v), leaf(right, v))


def _nested(outer: str, inner: str, inner_left: bool) -> Callable[[Values], Expr]:
    """`(a inner b) outer c` when inner_left, else `a outer (b inner c)`."""
    if inner_left:
        return lambda v: BinOp(outer, BinOp(inner, Num(v["a"]), Num(v["b"])), Num(v["c"]))
    return lambda v: BinOp(outer, Num(v["a"]), BinOp(inner, Num(v["b"]), Num(v["c"])))


@dataclass(frozen=True)
class Shape:
    """An expression shape: how to draw its operands and how they combine."""

    sample: Sampler
    """Draws the operands a, b (and c)."""
    build: Callable[[Values], Expr]
    """Builds the expression tree from the operands."""


SHAPES: dict[str, Shape] = {
    "a+b": Shape(_s_add, _op("+", "a", "b")),
    "a-b": Shape(_s_sub, _op("-", "a", "b")),
    "a*b": Shape(_s_mul, _op("*", "a", "b")),
    "a/b": Shape(_s_div, _op("/", "a", "b")),
    "(a+b)*c": Shape(_s_add_then_mul, _nested("*", "+", True)),
    "(a-b)*c": Shape(_s_sub_then_mul, _nested("*", "-", True)),
    "a*b+c": Shape(_s_mul_then_add, _nested("+", "*", True)),
    "a*b-c": Shape(_s_mul_then_sub, _nested("-", "*", True)),
    "a+b*c": Shape(_s_add_product, _nested("+", "*", False)),
    "a-b*c": Shape(_s_sub_product, _nested("-", "*", False)),
    "(a+b)/c": Shape(_s_sum_then_div, _nested("/", "+", True)),
    "(a-b)/c": Shape(_s_diff_then_div, _nested("/", "-", True)),
    "a/b+c": Shape(_s_div_then_add, _nested("+", "/", True)),
}
"""Every expression shape, by a name that is its own formula."""

TWO_OPERAND_SHAPES = {"+": "a+b", "-": "a-b", "*": "a*b", "/": "a/b"}
"""Two-operand shape of each operator (levels 1 and 3)."""
THREE_OPERAND_SHAPES = ("(a+b)*c", "(a-b)*c", "a*b+c", "a*b-c", "a+b*c", "a-b*c", "(a+b)/c", "(a-b)/c", "a/b+c")
"""Level-2 shapes."""

PLAIN_FORMS = {
    "what_is": "What is {e}?",
    "compute": "Compute {e}.",
    "calculate": "Calculate {e}.",
    "evaluate": "Evaluate {e}.",
    "value_of": "Find the value of {e}.",
    "work_out": "Work out {e}.",
}
"""Surface forms of levels 1 and 2; `{e}` is the rendered expression."""


@dataclass(frozen=True)
class WordedOperation:
    """A level-3 phrasing: one operation written in words, e.g. "Subtract {b} from {a}."

    The expression is always `a op b` of `shape` (so a > b for "-" and b divides a for "/"),
    whatever order the words name the operands in.
    """

    name: str
    """Template id (recorded in `Problem.info["template"]`)."""
    shape: str
    """One of `TWO_OPERAND_SHAPES.values()` (a key of `SHAPES`): the expression that answers it."""
    text: str
    """The question, with placeholders {a} and {b}."""


LEVEL3_TEMPLATES = (
    WordedOperation("L3:plus", "a+b", "What is {a} plus {b}?"),
    WordedOperation("L3:add", "a+b", "Add {a} and {b}."),
    WordedOperation("L3:sum_of", "a+b", "Find the sum of {a} and {b}."),
    WordedOperation("L3:add_to", "a+b", "What do you get when you add {b} to {a}?"),
    WordedOperation("L3:minus", "a-b", "What is {a} minus {b}?"),
    WordedOperation("L3:subtract_from", "a-b", "Subtract {b} from {a}."),
    WordedOperation("L3:difference_of", "a-b", "Find the difference between {a} and {b}."),
    WordedOperation("L3:take_away", "a-b", "What is {a} take away {b}?"),
    WordedOperation("L3:times", "a*b", "What is {a} times {b}?"),
    WordedOperation("L3:multiply_by", "a*b", "Multiply {a} by {b}."),
    WordedOperation("L3:product_of", "a*b", "Find the product of {a} and {b}."),
    WordedOperation("L3:multiplied_by", "a*b", "What is {a} multiplied by {b}?"),
    WordedOperation("L3:divided_by", "a/b", "What is {a} divided by {b}?"),
    WordedOperation("L3:divide_by", "a/b", "Divide {a} by {b}."),
    WordedOperation("L3:quotient_of", "a/b", "Find the quotient of {a} and {b}."),
    WordedOperation("L3:goes_into", "a/b", "How many times does {b} go into {a}?"),
)
"""Level 3: one operation in words, four phrasings per operator."""

LEAD_INS = (
    "{name} has {d} {item}.",
    "There are {d} {item} on the table.",
    "{name} walked {d} meters today.",
    "{name}'s class has {d} students.",
    "A shelf holds {d} {item}.",
    "{name} read {d} pages yesterday.",
)
"""Irrelevant first sentences of level 3, each with one number {d} (and maybe {name}, {item})."""


@dataclass(frozen=True)
class WordTemplate:
    """A word problem: setup sentences, then (maybe an irrelevant sentence, then) the question.

    Placeholders: {a} {b} {c} the operands of `shape`; {d} an irrelevant number; {name} {name2}
    two different people; {item} {other} two different plural nouns; {container} {containers}.
    """

    name: str
    """Template id, unique across levels (recorded in `Problem.info["template"]`)."""
    shape: str
    """Key of `SHAPES`: the expression that answers it."""
    setup: str
    """Sentences stating the facts."""
    question: str
    """The final question sentence."""


LEVEL4_TEMPLATES = (
    WordTemplate("L4:containers", "a*b", "A {container} holds {b} {item}.", "How many {item} are in {a} {containers}?"),
    WordTemplate("L4:wage", "a*b", "{name} earns ${b} per hour.", "How many dollars does {name} earn in {a} hours?"),
    WordTemplate("L4:rows", "a*b", "A stadium has {a} rows with {b} seats in each row.", "How many seats are there?"),
    WordTemplate("L4:buy_more", "a+b", "{name} has {a} {item} and buys {b} more.",
                 "How many {item} does {name} have now?"),
    WordTemplate("L4:two_days", "a+b", "A shop sold {a} {item} on Monday and {b} on Tuesday.",
                 "How many {item} did it sell on both days?"),
    WordTemplate("L4:give_away", "a-b", "{name} had {a} {item} and gave {b} to {name2}.",
                 "How many {item} does {name} have left?"),
    WordTemplate("L4:more_than", "a-b", "{name} has {a} {item} and {name2} has {b} {item}.",
                 "How many more {item} does {name} have than {name2}?"),
    WordTemplate("L4:share", "a/b", "{name} shares {a} {item} equally among {b} friends.",
                 "How many {item} does each friend get?"),
    WordTemplate("L4:pack", "a/b", "A factory packs {a} {item} into {containers} of {b}.",
                 "How many {containers} does it fill?"),
    WordTemplate("L4:trips", "a/b", "A truck carries {b} {containers} per trip.",
                 "How many trips does it need to move {a} {containers}?"),
)
"""Level 4: one operation."""

LEVEL5_TEMPLATES = (
    WordTemplate("L5:school", "a*b-c", "A district has {a} classes of {b} students. {c} students are absent "
                 "and the district has {d} buses.", "How many students are present?"),
    WordTemplate("L5:eggs", "a*b+c", "A farm fills {a} cartons with {b} eggs each and has {c} eggs left over.",
                 "How many eggs does the farm have?"),
    WordTemplate("L5:tickets", "(a+b)*c", "A theater sold {a} tickets on Friday and {b} on Saturday at ${c} each.",
                 "How many dollars did the tickets bring in?"),
    WordTemplate("L5:broken", "(a-b)*c", "A factory made {a} chairs, but {b} were broken. Each good chair sells "
                 "for ${c}.", "How many dollars do the good chairs bring in?"),
    WordTemplate("L5:library", "a+b*c", "A library has {a} books and receives {b} boxes of {c} books.",
                 "How many books does it have now?"),
    WordTemplate("L5:budget", "a-b*c", "{name} has ${a} and buys {b} {item} at ${c} each.",
                 "How many dollars does {name} have left?"),
    WordTemplate("L5:pool", "(a+b)/c", "{name} has {a} {item} and {name2} has {b}. They pack all of them into "
                 "{containers} of {c}.", "How many {containers} do they fill?"),
    WordTemplate("L5:leftover_packs", "(a-b)/c", "{name} has {a} {item}, gives {b} away, and packs the rest "
                 "into {containers} of {c}.", "How many {containers} are filled?"),
    WordTemplate("L5:bonus", "a/b+c", "{a} {item} are split equally among {b} teams. Then each team gets {c} more.",
                 "How many {item} does each team have?"),
    WordTemplate("L5:returns", "a*b-c", "{name} orders {a} {containers} of {b} {item} and returns {c} {item}.",
                 "How many {item} does {name} keep?"),
    WordTemplate("L5:savings", "a*b+c", "{name} had ${c} and then saved ${b} every week for {a} weeks.",
                 "How many dollars does {name} have now?"),
    WordTemplate("L5:garden", "(a+b)*c", "{name} plants {a} rows of roses and {b} rows of tulips, with {c} "
                 "flowers in each row.", "How many flowers are planted?"),
)
"""Level 5: two operations."""

DISTRACTORS = (
    "{name2} lives {d} meters away.",
    "{name2} has {d} {other}.",
    "There are also {d} {other} on a shelf.",
    "The building has {d} windows.",
    "{name2} counted {d} {other} yesterday.",
    "The trip there took {d} minutes.",
)
"""Irrelevant sentences, each with one number {d}."""
DISTRACTOR_RATE = {3: 0.4, 4: 0.35, 5: 0.6}
"""Chance that a question of the level gets an irrelevant sentence: a lead-in (`LEAD_INS`) at level 3,
a distractor (`DISTRACTORS`) before the question at levels 4-5 (templates with their own {d} get none)."""

NAMES = ("Ava", "Ben", "Maya", "Liam", "Zoe", "Omar", "Nina", "Leo", "Sara", "Ravi", "Emma", "Kai", "Lena",
         "Tom", "Iris", "Yusuf", "Mia", "Jon")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cards", "coins", "beads", "stamps", "shells", "cookies",
         "buttons", "balloons")
CONTAINERS = (("box", "boxes"), ("crate", "crates"), ("bag", "bags"), ("jar", "jars"), ("carton", "cartons"),
              ("pack", "packs"))

TEMPLATES_BY_LEVEL: dict[int, tuple[str, ...]] = {
    1: tuple(f"L1:{form}" for form in PLAIN_FORMS),
    2: tuple(f"L2:{form}" for form in PLAIN_FORMS),
    3: tuple(t.name for t in LEVEL3_TEMPLATES),
    4: tuple(t.name for t in LEVEL4_TEMPLATES),
    5: tuple(t.name for t in LEVEL5_TEMPLATES),
}
"""Every template id, by level."""


@dataclass(frozen=True)
class Generated:
    """One generated question and the expression that answers it."""

    question: str
    """The question text."""
    expression: Expr
    """Its solution; `render(expression)` is the calculator call."""
    template: str
    """Template id (see `TEMPLATES_BY_LEVEL`)."""


def generate(level: int, rng: random.Random, ranges: OperandRanges) -> Generated:
    """A question of the given level (1-5), drawn with `rng` only."""
    if level in (1, 2):
        shape = rng.choice(list(TWO_OPERAND_SHAPES.values()) if level == 1 else THREE_OPERAND_SHAPES)
        form = rng.choice(list(PLAIN_FORMS))
        return plain_question(level, form, shape, rng.choice((ASCII_SYMBOLS, PRETTY_SYMBOLS)), rng, ranges)
    if level == 3:
        return _worded_question(rng.choice(LEVEL3_TEMPLATES), rng, ranges)
    if level in (4, 5):
        return _word_question(level, rng.choice(LEVEL4_TEMPLATES if level == 4 else LEVEL5_TEMPLATES), rng, ranges)
    raise ValueError(f"level must be 1, 2, 3, 4 or 5, got {level!r}")


def plain_question(level: int, form: str, shape: str, symbols: dict[str, str], rng: random.Random,
                   ranges: OperandRanges) -> Generated:
    """A level-1/2 question: `PLAIN_FORMS[form]` around a `shape` expression written with `symbols`."""
    expression = SHAPES[shape].build(SHAPES[shape].sample(rng, ranges))
    question = PLAIN_FORMS[form].format(e=render(expression, symbols))
    return Generated(question=question, expression=expression, template=f"L{level}:{form}")


def _slots(rng: random.Random, ranges: OperandRanges, values: Values) -> dict[str, object]:
    """Placeholder values: the operands, vocabulary, and an irrelevant number {d}."""
    name, name2 = rng.sample(NAMES, 2)
    item, other = rng.sample(ITEMS, 2)
    container, containers = rng.choice(CONTAINERS)
    return {"name": name, "name2": name2, "item": item, "other": other, "container": container,
            "containers": containers, "d": _draw(rng, ranges.small), **values}


def _worded_question(template: WordedOperation, rng: random.Random, ranges: OperandRanges) -> Generated:
    """Fill a level-3 phrasing, maybe after an irrelevant lead-in sentence."""
    values = SHAPES[template.shape].sample(rng, ranges)
    slots = _slots(rng, ranges, values)
    sentences = [template.text]
    if rng.random() < DISTRACTOR_RATE[3]:
        sentences.insert(0, rng.choice(LEAD_INS))
    question = " ".join(sentences).format(**slots)
    return Generated(question=question, expression=SHAPES[template.shape].build(values), template=template.name)


def _word_question(level: int, template: WordTemplate, rng: random.Random, ranges: OperandRanges) -> Generated:
    """Fill a word template: operands, vocabulary, and maybe an irrelevant sentence."""
    values = SHAPES[template.shape].sample(rng, ranges)
    slots = _slots(rng, ranges, values)
    sentences = [template.setup]
    has_own_distractor = "{d}" in template.setup
    if not has_own_distractor and rng.random() < DISTRACTOR_RATE[level]:
        sentences.append(rng.choice(DISTRACTORS))
    sentences.append(template.question)
    question = " ".join(sentences).format(**slots)
    return Generated(question=question, expression=SHAPES[template.shape].build(values), template=template.name)
