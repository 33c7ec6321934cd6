"""The calculator tool: safe arithmetic on a whitelisted subset of Python expressions.

The expression is parsed with ``ast`` and checked against a whitelist before anything is
computed; it is never passed to eval or exec. Size, depth, exponents and intermediate integer
magnitudes are bounded so no input can exhaust CPU or memory.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Callable
from typing import Any

from executor.tools.base import SchemaText, ToolContext, ToolError, register_tool

MAX_EXPRESSION_LENGTH = 500
MAX_NODES = 300
MAX_DEPTH = 100
MAX_EXPONENT = 1000
MAX_INT_BITS = 4096  # about 1233 decimal digits
MAX_ROUND_DIGITS = 100

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_SYMBOLS: dict[type[ast.AST], str] = {
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^",
    ast.BitAnd: "&",
    ast.MatMult: "@",
    ast.Invert: "~",
    ast.Not: "not",
}
_CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}
_FUNCTIONS = ("abs", "max", "min", "round", "sqrt")

_ALLOWED = (
    "only numbers, + - * / // % **, parentheses, the functions "
    f"{', '.join(_FUNCTIONS)} and the constants {', '.join(_CONSTANTS)} are allowed"
)

_DESCRIBE: dict[type[ast.AST], str] = {
    ast.Attribute: "attribute access is",
    ast.Subscript: "subscripts are",
    ast.Lambda: "lambdas are",
    ast.ListComp: "comprehensions are",
    ast.SetComp: "comprehensions are",
    ast.DictComp: "comprehensions are",
    ast.GeneratorExp: "comprehensions are",
    ast.List: "lists are",
    ast.Tuple: "tuples are",
    ast.Set: "sets are",
    ast.Dict: "dicts are",
    ast.Compare: "comparisons are",
    ast.BoolOp: "boolean operators are",
    ast.IfExp: "conditional expressions are",
    ast.NamedExpr: "assignments are",
    ast.JoinedStr: "strings are",
    ast.Starred: "starred arguments are",
    ast.Await: "await is",
}

_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "expression": {
            "type": "string",
            "description": "Arithmetic expression, for example '(2 + 3) * sqrt(16) / 7'.",
            "maxLength": MAX_EXPRESSION_LENGTH,
        },
    },
    "required": ["expression"],
    "additionalProperties": False,
}
_SCHEMA = SchemaText(_PARAMETERS)


class CalculatorTool:
    """Evaluates ``expression``; returns ``{"expression": ..., "result": number}``."""

    @property
    def name(self) -> str:
        return "calculator"

    @property
    def description(self) -> str:
        return (
            "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses, "
            "the functions sqrt, abs, round, min, max and the constants pi and e."
        )

    @property
    def parameters(self) -> dict[str, Any]:
        return _SCHEMA.copy()

    async def invoke(self, arguments: dict[str, Any], context: ToolContext) -> str:
        unknown = sorted(set(arguments) - {"expression"})
        if unknown:
            raise ToolError(f"calculator: unknown argument(s): {', '.join(unknown)}")
        expression = arguments.get("expression")
        if not isinstance(expression, str):
            raise ToolError("calculator: argument 'expression' must be a string")
        return json.dumps({"expression": expression, "result": evaluate(expression)})


def evaluate(expression: str) -> Number:
    """Evaluates a whitelisted arithmetic expression; raises ToolError for anything else."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise ToolError(
            f"calculator: expression is too long ({len(expression)} characters; "
            f"the limit is {MAX_EXPRESSION_LENGTH})"
        )
    if not expression.strip():
        raise ToolError("calculator: expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"calculator: invalid expression syntax: {exc.msg}") from exc
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ToolError("calculator: invalid expression") from exc
    _check(tree.body)
    try:
        return _eval(tree.body)
    except ZeroDivisionError as exc:
        raise ToolError("calculator: division by zero") from exc
    except OverflowError as exc:
        raise ToolError("calculator: result is too large") from exc
    except (ValueError, TypeError) as exc:
        raise ToolError(f"calculator: {exc}") from exc


def _check(root: ast.expr) -> None:
    """Rejects any node outside the whitelist, and trees too large or deep. Computes nothing."""
    stack: list[tuple[ast.expr, int]] = [(root, 1)]
    count = 0
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ToolError(f"calculator: expression is too complex (over {MAX_NODES} parts)")
        if depth > MAX_DEPTH:
            raise ToolError(f"calculator: expression is nested too deeply (over {MAX_DEPTH})")
        children: list[ast.expr] = []
        if isinstance(node, ast.Constant):
            _check_constant(node.value)
        elif isinstance(node, ast.Name):
            if node.id in _FUNCTIONS:
                raise ToolError(f"calculator: function {node.id!r} must be called; {_ALLOWED}")
            if node.id not in _CONSTANTS:
                raise ToolError(f"calculator: the name {node.id!r} is not allowed; {_ALLOWED}")
        elif isinstance(node, ast.BinOp):
            if type(node.op) not in _BINARY:
                raise ToolError(
                    f"calculator: the operator {_op_text(node)} is not allowed; {_ALLOWED}"
                )
            children = [node.left, node.right]
        elif isinstance(node, ast.UnaryOp):
            if type(node.op) not in _UNARY:
                raise ToolError(
                    f"calculator: the operator {_op_text(node)} is not allowed; {_ALLOWED}"
                )
            children = [node.operand]
        elif isinstance(node, ast.Call):
            _check_call(node)
            children = list(node.args)
        else:
            raise ToolError(f"calculator: {_describe(node)} not allowed; {_ALLOWED}")
        stack.extend((child, depth + 1) for child in children)


def _check_constant(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        what = {
            str: "strings are",
            bytes: "bytes are",
            bool: "booleans are",
            complex: "complex numbers are",
        }
        kind = what.get(type(value), f"the constant {value!r} is")
        raise ToolError(f"calculator: {kind} not allowed; {_ALLOWED}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("calculator: numbers must be finite")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("calculator: a number in the expression is too large")


def _check_call(node: ast.Call) -> None:
    if not isinstance(node.func, ast.Name):
        what = _DESCRIBE.get(type(node.func), "calling this expression is")
        raise ToolError(f"calculator: {what} not allowed; {_ALLOWED}")
    name = node.func.id
    if name not in _FUNCTIONS:
        raise ToolError(f"calculator: calling {name!r} is not allowed; {_ALLOWED}")
    if node.keywords:
        raise ToolError(f"calculator: keyword arguments are not allowed in {name}()")
    count = len(node.args)
    if name in ("abs", "sqrt") and count != 1:
        raise ToolError(f"calculator: {name}() takes exactly one argument")
    if name == "round" and count not in (1, 2):
        raise ToolError("calculator: round() takes one or two arguments")
    if name in ("min", "max") and count < 1:
        raise ToolError(f"calculator: {name}() takes at least one argument")


def _describe(node: ast.AST) -> str:
    return _DESCRIBE.get(type(node), f"{type(node).__name__} expressions are")


def _op_text(node: ast.BinOp | ast.UnaryOp) -> str:
    return _SYMBOLS.get(type(node.op), type(node.op).__name__)


def _eval(node: ast.expr) -> Number:
    """Evaluates a tree that passed _check (so recursion is bounded by MAX_DEPTH)."""
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.Name):
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp):
        return _bounded(_UNARY[type(node.op)](_eval(node.operand)))
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return _call(node.func.id, [_eval(arg) for arg in node.args])
    raise ToolError("calculator: unsupported expression")  # unreachable after _check


def _call(name: str, args: list[Number]) -> Number:
    if name == "sqrt":
        if args[0] < 0:
            raise ToolError("calculator: sqrt() of a negative number is not a real number")
        return _bounded(math.sqrt(args[0]))
    if name == "abs":
        return _bounded(abs(args[0]))
    if name == "min":
        return min(args)
    if name == "max":
        return max(args)
    if len(args) == 1:
        return _bounded(round(args[0]))
    digits = args[1]
    if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
        raise ToolError(
            f"calculator: round()'s second argument must be an integer of at most "
            f"{MAX_ROUND_DIGITS} in magnitude"
        )
    return _bounded(round(args[0], digits))


def _check_power(base: Number, exponent: Number) -> None:
    if abs(exponent) > MAX_EXPONENT:
        raise ToolError(
            f"calculator: exponent {_short(exponent)} is too large (the limit is {MAX_EXPONENT})"
        )
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and exponent > 0
        and abs(base).bit_length() * exponent > MAX_INT_BITS
    ):
        raise ToolError("calculator: result is too large")


def _bounded(value: object) -> Number:
    """Rejects results that are not finite real numbers or are too large an integer."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolError("calculator: result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError("calculator: result is too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("calculator: result is too large")
    return value


def _short(value: Number) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


register_tool(CalculatorTool())
