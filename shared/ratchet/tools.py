"""Tools an agent may call, by name. Each is safe: it computes and touches nothing outside."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

from langchain_core.tools import BaseTool, tool

_OPERATORS: dict[type[ast.AST], Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}
_MAX_EXPONENT = 64
_MAX_BITS = 4096  # bounds the size of any intermediate integer, so no expression can stall a run


def evaluate_arithmetic(expression: str) -> float | int:
    """Evaluate + - * / // % ** on numbers, by walking the syntax tree (no ``eval``)."""

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            if isinstance(node.value, bool):
                raise ValueError("booleans are not numbers here")
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow):
                if abs(right) > _MAX_EXPONENT:
                    raise ValueError("exponent too large")
                if (
                    isinstance(left, int)
                    and right > 0
                    and abs(left).bit_length() * right > _MAX_BITS
                ):
                    raise ValueError("result too large")
            result = _OPERATORS[type(node.op)](left, right)
            if isinstance(result, int) and result.bit_length() > _MAX_BITS:
                raise ValueError("result too large")
            return result  # type: ignore[no-any-return]
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.operand))  # type: ignore[no-any-return]
        raise ValueError(f"unsupported syntax: {ast.dump(node)[:60]}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    return walk(tree)


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as '12 * (3 + 4)' and return the result."""
    try:
        value = evaluate_arithmetic(expression)
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    except (ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"


@tool
def word_count(text: str) -> str:
    """Count the words in a text."""
    return str(len(text.split()))


TOOLS: dict[str, BaseTool] = {t.name: t for t in (calculator, word_count)}


def get_tools(names: list[str] | None = None) -> list[BaseTool]:
    """The named tools (all of them when ``names`` is None); an unknown name is an error."""
    if names is None:
        return list(TOOLS.values())
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; known: {sorted(TOOLS)}")
    return [TOOLS[n] for n in names]
