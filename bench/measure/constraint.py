"""Sweep constraints: small Python expressions over a case's parameters (`tile_m * head_dim <=
8192`), parsed and checked to hold names, numbers, arithmetic, comparisons and and/or/not only,
then evaluated with bounded integers; nothing in them can call code."""
from __future__ import annotations

import ast
import operator

MAX_INT_BITS = 256  # of any number a constraint computes

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow, ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
        ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge, ast.USub: operator.neg,
        ast.Not: operator.not_, ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _check_expr(node: ast.AST) -> None:
    """Allow names, constants, arithmetic, comparisons and and/or/not: nothing that calls code."""
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.BinOp, ast.UnaryOp, ast.Compare,
               ast.Name, ast.Load, ast.Constant, ast.Tuple, ast.List) + tuple(_OPS)
    for n in ast.walk(node):
        if not isinstance(n, allowed):
            raise ValueError(f"'{type(n).__name__}' is not allowed in a constraint")


def _arith(op, *args):
    """An arithmetic step on numbers only, with bounded integers: `2 ** 10 ** 10` or `'a' * 10 ** 9`
    in a constraint is refused, not computed."""
    if not all(isinstance(a, (int, float)) for a in args):
        raise TypeError("arithmetic needs numbers, got " + ", ".join(type(a).__name__ for a in args))
    if op is operator.pow and isinstance(args[1], int) and isinstance(args[0], int):
        if abs(args[1]) > MAX_INT_BITS or abs(args[0]).bit_length() * abs(args[1]) > MAX_INT_BITS:
            raise OverflowError(f"{args[0]} ** {args[1]} is too large")
    result = op(*args)
    if isinstance(result, int) and result.bit_length() > MAX_INT_BITS:
        raise OverflowError(f"a number of more than {MAX_INT_BITS} bits")
    return result


def evaluate(node: ast.AST, env: dict):
    """The value of a parsed constraint with the sweep's parameters as its names."""
    if isinstance(node, ast.Expression):
        return evaluate(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [evaluate(e, env) for e in node.elts]
    if isinstance(node, ast.BinOp):
        return _arith(_OPS[type(node.op)], evaluate(node.left, env), evaluate(node.right, env))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return not evaluate(node.operand, env)
        return _arith(_OPS[type(node.op)], evaluate(node.operand, env))
    if isinstance(node, ast.BoolOp):
        values = (evaluate(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    left = evaluate(node.left, env)
    for op, right in zip(node.ops, node.comparators):
        right = evaluate(right, env)
        if not _OPS[type(op)](left, right):
            return False
        left = right
    return True


def parse(text: str) -> ast.Expression:
    """A constraint's text as a checked expression tree; ValueError says why it is refused."""
    if len(text) > 1000:
        raise ValueError("longer than 1000 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (RecursionError, MemoryError):
        raise ValueError("nested too deeply") from None
    _check_expr(tree)
    return tree
