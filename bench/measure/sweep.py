"""Sweep files: load YAML (safe_load semantics, with line numbers kept for errors), validate every
field, and expand the axes into plain-data cases."""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import operator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import workloads

TIMING_DEFAULTS = {
    "warmup_ms": 100.0,  # warm up for this long before timing
    "min_reps": 10,
    "max_reps": 10000,
    "max_time_s": 2.0,  # timing budget per case
    "target_ci": 0.01,  # stop once the median's 95% CI half-width is under this fraction
    "l2_flush": True,
    "cuda_graph": False,
    "hide_launch": True,  # queue each rep behind a spin kernel so events time the GPU, not Python
    "timeout_s": 600.0,  # a case still running after this is killed and marked `timeout`
}
COMPARE_DEFAULTS = {"threshold": 0.03}
# A sweep file is small; these bound what a hostile or broken one can cost before it is refused.
MAX_BYTES = 256 << 10
MAX_NODES = 20_000  # YAML values, aliases expanded
MAX_DEPTH = 32  # nesting of mappings and lists
MAX_CASES = 100_000
MAX_INT_BITS = 256  # of any number a constraint computes
TOP_KEYS = {"name", "workload", "baseline", "providers", "axes", "zip", "include", "exclude",
            "constraints", "timing", "tolerance", "compare", "profiles"}
PROFILE_KEYS = TOP_KEYS - {"name", "workload", "profiles"}


class SweepError(Exception):
    """A sweep file or an override is wrong; the message is one line: where, which key, what."""


@dataclass
class Case:
    """One unit of work: a provider of a workload at one point of the axes. Plain data."""
    case_id: str
    workload: str
    provider: str
    baseline: str
    params: dict[str, Any]
    shape: dict[str, Any]  # params without the provider's own axes: what a baseline is matched on
    timing: dict[str, Any]
    tolerance: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # 'module:function' of a user provider

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Case":
        return Case(**d)

    @property
    def label(self) -> str:
        return f"{self.provider} " + " ".join(f"{k}={v}" for k, v in self.params.items())


@dataclass
class Sweep:
    name: str
    path: str
    sha256: str
    workload: str
    baseline: str
    profile: str | None
    compare: dict
    cases: list[Case]


def _read(path: Path) -> str:
    """The file as text: at most MAX_BYTES of UTF-8, read no further than that."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise SweepError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    if len(data) > MAX_BYTES:
        raise SweepError(f"{path}: larger than {MAX_BYTES >> 10} KiB; not a sweep file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SweepError(f"{path}:{line}: not UTF-8 text (byte {e.start}); not a sweep file") from None


# ---- YAML with line numbers ------------------------------------------------------------------

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when present: 10x faster


class _Doc:
    """The parsed document plus the line of every key and item, for error messages."""

    def __init__(self, path: Path, text: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        try:
            self._scan(text)
            loader = _Loader(text)
            try:
                node = loader.get_single_node()
                if node is not None:
                    self._bound(node)
                self.data = {} if node is None else self._convert(loader, node, ())
            finally:
                loader.dispose()
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
            raise SweepError(f"{path}{line}: not valid YAML ({problem})") from None
        except (RecursionError, MemoryError):
            raise SweepError(f"{path}: too large or nested too deeply for a sweep file") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise SweepError(f"{path}: not a usable value ({_first_line(e)})") from None

    def _scan(self, text: str) -> None:
        """Walk the parser's events once, before any value is built, and stop at the first one past
        MAX_DEPTH levels of nesting or MAX_NODES values: parsing deep nesting costs time that grows
        with the square of the depth, so it must end early."""
        loader = _Loader(text)
        depth = count = 0
        try:
            while loader.check_event():
                event = loader.get_event()
                count += 1
                if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                    depth += 1
                elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                    depth -= 1
                if depth > MAX_DEPTH or count > MAX_NODES:
                    what = f"nested more than {MAX_DEPTH} levels deep" if depth > MAX_DEPTH \
                        else f"more than {MAX_NODES} values"
                    raise SweepError(f"{self.path}:{event.start_mark.line + 1}: {what}; not a sweep file")
        finally:
            loader.dispose()

    def _bound(self, root) -> None:
        """Refuse, before anything is built, a document whose aliases expand past MAX_NODES values
        (an alias bomb), that refers to itself, or that nests deeper than MAX_DEPTH."""
        sizes: dict[int, int] = {}

        def size(node, depth: int) -> int:
            if id(node) in sizes:
                if sizes[id(node)] < 0:
                    self._fail(node, "an alias refers to the value that contains it")
                return sizes[id(node)]
            if depth > MAX_DEPTH:
                self._fail(node, f"nested more than {MAX_DEPTH} levels deep")
            sizes[id(node)] = -1
            children = (node.value if isinstance(node, yaml.SequenceNode) else
                        [n for kv in node.value for n in kv] if isinstance(node, yaml.MappingNode) else [])
            total = 1
            for child in children:
                total += size(child, depth + 1)
                if total > MAX_NODES:
                    self._fail(node, f"expands to more than {MAX_NODES} values (aliases?); not a sweep file")
            sizes[id(node)] = total
            return total

        size(root, 0)

    def _fail(self, node, msg: str):
        raise SweepError(f"{self.path}:{node.start_mark.line + 1}: {msg}")

    def _convert(self, loader, node, at: tuple):
        self.lines[at] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self._fail(key_node, "a key must be a plain value, not a mapping or list")
                key = loader.construct_object(key_node, deep=True)
                if key in out:
                    raise SweepError(f"{self.path}:{key_node.start_mark.line + 1}: "
                                     f"duplicate key '{key}'")
                out[key] = self._convert(loader, value_node, at + (key,))
                self.lines[at + (key,)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._convert(loader, n, at + (i,)) for i, n in enumerate(node.value)]
        return loader.construct_object(node, deep=True)

    def where(self, at: tuple) -> str:
        while at and at not in self.lines:
            at = at[:-1]
        return f"{self.path}:{self.lines.get(at, 1)}"


# ---- constraint expressions ------------------------------------------------------------------

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


def _eval(node: ast.AST, env: dict):
    if isinstance(node, ast.Expression):
        return _eval(node.body, env)
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return env[node.id]
    if isinstance(node, (ast.Tuple, ast.List)):
        return [_eval(e, env) for e in node.elts]
    if isinstance(node, ast.BinOp):
        return _arith(_OPS[type(node.op)], _eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.Not):
            return not _eval(node.operand, env)
        return _arith(_OPS[type(node.op)], _eval(node.operand, env))
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, env) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    left = _eval(node.left, env)
    for op, right in zip(node.ops, node.comparators):
        right = _eval(right, env)
        if not _OPS[type(op)](left, right):
            return False
        left = right
    return True


def _compile_constraint(text: str) -> ast.Expression:
    if len(text) > 1000:
        raise ValueError("longer than 1000 characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (RecursionError, MemoryError):
        raise ValueError("nested too deeply") from None
    _check_expr(tree)
    return tree


# ---- validation ------------------------------------------------------------------------------

class _Validator:
    def __init__(self, doc: _Doc):
        self.doc = doc

    def fail(self, at: tuple, msg: str):
        key = ".".join(str(k)[:40] for k in at) or "(top level)"
        raise SweepError(f"{self.doc.where(at)}: {key}: {msg}")

    def mapping(self, value, at, keys=None):
        if not isinstance(value, dict):
            self.fail(at, f"expected a mapping, got {_kind(value)}")
        if keys is not None:
            for k in value:
                if k not in keys:
                    self.fail(at + (k,), f"unknown key (expected one of {', '.join(sorted(keys))})")
        return value

    def seq(self, value, at, nonempty=True):
        if not isinstance(value, list):
            self.fail(at, f"expected a list, got {_kind(value)}")
        if nonempty and not value:
            self.fail(at, "expected a non-empty list")
        return value

    def string(self, value, at):
        if not isinstance(value, str) or not value:
            self.fail(at, f"expected a non-empty string, got {_kind(value)}")
        return value

    def number(self, value, at, positive=True, integer=False):
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.fail(at, f"expected {'an integer' if integer else 'a number'}, got {_kind(value)}")
        if not math.isfinite(value) or abs(value) > 1e12:
            self.fail(at, f"expected a finite number of sensible size, got {_kind(value)}")
        if positive and value <= 0:
            self.fail(at, f"expected a positive number, got {value}")
        if value < 0:
            self.fail(at, f"expected zero or more, got {value}")
        return value


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _merge_profile(data: dict, profile: dict) -> dict:
    """A profile's axes, timing and tolerance are merged key by key; its other keys replace."""
    out = dict(data)
    for key, value in profile.items():
        if key in ("axes", "timing", "tolerance", "compare") and isinstance(value, dict):
            out[key] = {**(data.get(key) or {}), **value}
        else:
            out[key] = value
    return out


def _parse_override(text: str, flag: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SweepError(f"{flag} {text!r}: expected key=value")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise SweepError(f"{flag} {text!r}: the value is not valid YAML") from None


def _apply_set(data: dict, overrides: list[str], axis_names: set[str]) -> dict:
    """--set timing.max_time_s=1 / axes.seq_len=[128,256] / seq_len=128 (an axis, by its name)."""
    data = json.loads(json.dumps(data, default=str))
    for text in overrides:
        key, value = _parse_override(text, "--set")
        path = key.split(".")
        if len(path) == 1 and path[0] not in TOP_KEYS:
            if path[0] not in axis_names:
                raise SweepError(f"--set {text!r}: '{key}' is neither a sweep key nor an axis")
            path = ["axes", path[0]]
        if path[0] == "axes" and len(path) == 2 and not isinstance(value, list):
            value = [value]
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SweepError(f"--set {text!r}: '{part}' is not a mapping")
        node[path[-1]] = value
    return data


def _expand_axes(v: _Validator, axes: dict, zips: list, at: tuple) -> list[dict]:
    """The cartesian product of the axes, where each zip group counts as one axis."""
    grouped, groups = set(), []
    for gi, group in enumerate(zips):
        v.seq(group, at + (gi,))
        for name in group:
            if not isinstance(name, str) or name not in axes:
                v.fail(at + (gi,), f"'{name}' is not an axis")
            if name in grouped:
                v.fail(at + (gi,), f"'{name}' is in two zip groups")
            grouped.add(name)
        lengths = {len(axes[n]) for n in group}
        if len(lengths) != 1:
            v.fail(at + (gi,), "zipped axes need lists of one length, got "
                   + ", ".join(f"{n}: {len(axes[n])}" for n in group))
        groups.append([dict(zip(group, vals)) for vals in zip(*(axes[n] for n in group))])
    for name, values in axes.items():
        if name not in grouped:
            groups.append([{name: x} for x in values])
    if math.prod(len(g) for g in groups) > MAX_CASES:
        v.fail(at[:-1] + ("axes",), f"the axes give more than {MAX_CASES} points")
    return [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*groups)]


def _case_id(workload: str, provider: str, params: dict) -> str:
    blob = json.dumps([workload, provider, params], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _matches(params: dict, rule: dict) -> bool:
    return all(k in params and _same(params[k], want) for k, want in rule.items())


def _same(value, want) -> bool:
    if isinstance(want, list):
        return any(_same(value, w) for w in want)
    return value == want or str(value) == str(want)


def load(path, profile: str | None = None, overrides: list[str] = (), filters: list[str] = (),
         providers: list[str] | None = None) -> Sweep:
    """Load, validate and expand a sweep file. Raises SweepError with one line on any problem."""
    path = Path(path)
    text = _read(path)
    doc = _Doc(path, text)
    v = _Validator(doc)
    data = v.mapping(doc.data, (), TOP_KEYS)
    for key in ("workload", "baseline", "providers", "axes"):
        if key not in data:
            v.fail((), f"missing required key '{key}'")
    wl_name = v.string(data["workload"], ("workload",))
    try:
        wl = workloads.get(wl_name)
    except KeyError:
        v.fail(("workload",), f"unknown workload '{wl_name}' (known: {', '.join(workloads.names())})")

    profiles = v.mapping(data.get("profiles") or {}, ("profiles",))
    for pname, pdata in profiles.items():
        v.mapping(pdata, ("profiles", pname), PROFILE_KEYS)
    if profile is not None and profile != "gpu" and profile not in profiles:
        raise SweepError(f"{path}: no profile '{profile}' (defined: {', '.join(profiles) or 'none'})")
    if profile in profiles:
        data = _merge_profile(data, profiles[profile])
    data = _apply_set(data, list(overrides), set(wl.defaults) | set(data.get("axes") or {}))

    # providers
    prov_specs = []
    for i, item in enumerate(v.seq(data["providers"], ("providers",))):
        at = ("providers", i)
        if isinstance(item, str):
            item = {"name": item}
        v.mapping(item, at, {"name", "axes", "zip", "module"})
        name = v.string(item.get("name"), at + ("name",))
        module = item.get("module")
        if module is not None:
            v.string(module, at + ("module",))
            try:
                workloads.load_user_provider(module)
            except ValueError as e:
                v.fail(at + ("module",), str(e))
            except Exception as e:  # the user's module failed to import, or lacks the function
                v.fail(at + ("module",), f"cannot load {module!r} ({type(e).__name__}: {e})")
        elif name not in wl.providers:
            v.fail(at + ("name",), f"unknown provider '{name}' for workload {wl_name} "
                   f"(known: {', '.join(wl.providers)}; or give module: 'pkg.mod:factory')")
        if name in (p["name"] for p in prov_specs):
            v.fail(at + ("name",), f"provider '{name}' is listed twice")
        paxes = v.mapping(item.get("axes") or {}, at + ("axes",))
        for ax, values in paxes.items():
            v.seq(values, at + ("axes", ax))
            if ax in wl.defaults:
                v.fail(at + ("axes", ax), f"'{ax}' is a workload axis; provider axes must differ")
        pzip = v.seq(item.get("zip") or [], at + ("zip",), nonempty=False)
        prov_specs.append({"name": name, "module": module, "axes": paxes, "zip": pzip, "at": at})
    baseline = v.string(data["baseline"], ("baseline",))
    if baseline not in (p["name"] for p in prov_specs):
        v.fail(("baseline",), f"baseline '{baseline}' is not one of the providers")
    provider_axes = {ax for spec in prov_specs for ax in spec["axes"]}  # before --providers filters
    if providers is not None:
        unknown = [p for p in providers if p not in (s["name"] for s in prov_specs)]
        if unknown:
            raise SweepError(f"--providers: unknown provider(s) {', '.join(unknown)} "
                             f"(this sweep has: {', '.join(s['name'] for s in prov_specs)})")
        prov_specs = [s for s in prov_specs if s["name"] in providers]

    # axes, checked against the workload's defaults for name, type and choices
    axes = v.mapping(data["axes"], ("axes",))
    for name, values in axes.items():
        at = ("axes", name)
        if name not in wl.defaults:
            v.fail(at, f"unknown axis for workload {wl_name} (known: {', '.join(wl.defaults)})")
        for j, x in enumerate(v.seq(values, at)):
            _check_value(v, wl, name, x, at + (j,))
    timing = {**TIMING_DEFAULTS, **v.mapping(data.get("timing") or {}, ("timing",), set(TIMING_DEFAULTS))}
    for key, value in timing.items():
        at = ("timing", key)
        if isinstance(TIMING_DEFAULTS[key], bool):
            if not isinstance(value, bool):
                v.fail(at, f"expected true or false, got {_kind(value)}")
        else:
            v.number(value, at, positive=key != "warmup_ms", integer=key in ("min_reps", "max_reps"))
    if timing["min_reps"] > timing["max_reps"]:
        v.fail(("timing", "min_reps"), "min_reps is larger than max_reps")
    if timing["target_ci"] >= 1:
        v.fail(("timing", "target_ci"), f"expected a fraction below 1, got {timing['target_ci']}")
    if timing["warmup_ms"] / 1e3 + timing["max_time_s"] >= timing["timeout_s"]:
        v.fail(("timing", "timeout_s"), f"{timing['timeout_s']:g} s leaves no time: warmup_ms and "
               "max_time_s alone take that long")
    tolerance = v.mapping(data.get("tolerance") or {}, ("tolerance",))
    for dt, tol in tolerance.items():
        v.mapping(tol, ("tolerance", dt), {"max_abs", "rel"})
        for k, x in tol.items():
            v.number(x, ("tolerance", dt, k))
    compare = {**COMPARE_DEFAULTS, **v.mapping(data.get("compare") or {}, ("compare",), set(COMPARE_DEFAULTS))}
    v.number(compare["threshold"], ("compare", "threshold"))
    constraints = []
    for i, text in enumerate(v.seq(data.get("constraints") or [], ("constraints",), nonempty=False)):
        try:
            constraints.append((i, text, _compile_constraint(v.string(text, ("constraints", i)))))
        except (SyntaxError, ValueError) as e:
            v.fail(("constraints", i), f"bad expression {text[:80]!r} "
                   f"({e.msg if isinstance(e, SyntaxError) else e})")

    # points: the product, plus include points, minus exclude rules, within the constraints
    zips = v.seq(data.get("zip") or [], ("zip",), nonempty=False)
    points = _expand_axes(v, axes, zips, ("zip",))
    for i, rule in enumerate(v.seq(data.get("include") or [], ("include",), nonempty=False)):
        at = ("include", i)
        v.mapping(rule, at)
        for k, x in rule.items():
            if k not in wl.defaults:
                v.fail(at + (k,), f"unknown axis for workload {wl_name}")
            _check_value(v, wl, k, x, at + (k,))
        for group in zips:
            named = [n for n in group if n in rule]
            if named and len(named) != len(group):
                v.fail(at, f"names {', '.join(named)} of the zip group [{', '.join(group)}]: "
                       "name all of them or none")
        fixed_axes = {**axes, **{k: [x] for k, x in rule.items()}}
        for p in _expand_axes(v, fixed_axes, [g for g in zips if not any(n in rule for n in g)], ("zip",)):
            if p not in points:
                points.append(p)
    excludes = v.seq(data.get("exclude") or [], ("exclude",), nonempty=False)
    for i, rule in enumerate(excludes):
        v.mapping(rule, ("exclude", i))
    points = [{**wl.defaults, **p} for p in points]

    filt = [_parse_override(f, "--filter") for f in filters]
    for key, want in filt:
        if key not in wl.defaults and not any(key in s["axes"] for s in prov_specs):
            raise SweepError(f"--filter {key}: not an axis of this sweep")
        values = [p[key] for p in points if key in p] + [x for s in prov_specs for x in s["axes"].get(key, [])]
        if not any(_same(x, want) for x in values):
            replaced = profile in profiles and key in (profiles[profile].get("axes") or {})
            raise SweepError(
                f"--filter {key}={want}: no case has it ({key} is {list(dict.fromkeys(values))}"
                + (f": the '{profile}' profile replaced {key}; --profile none keeps the sweep's own)"
                   if replaced else ")"))

    cases = []
    for point in points:
        for spec in prov_specs:
            for extra in _expand_axes(v, spec["axes"], spec["zip"], spec["at"] + ("zip",)):
                params = {**point, **extra}
                if any(_matches(params, r) for r in excludes):  # provider axes can be excluded too
                    continue
                if not _within(v, constraints, params, provider_axes) or not all(
                        _same(params.get(k), want) for k, want in filt if k in params):
                    continue
                if len(cases) >= MAX_CASES:
                    v.fail((), f"more than {MAX_CASES} cases")
                cases.append(Case(
                    case_id=_case_id(wl_name, spec["name"], params), workload=wl_name,
                    provider=spec["name"], baseline=baseline, params=params, shape=dict(point),
                    timing=dict(timing), tolerance=tolerance, module=spec["module"]))
    return Sweep(name=data.get("name") or path.stem, path=str(path),
                 sha256=hashlib.sha256(text.encode()).hexdigest(), workload=wl_name,
                 baseline=baseline, profile=profile, compare=compare, cases=cases)


def _check_value(v: _Validator, wl, name: str, x, at: tuple) -> None:
    default = wl.defaults[name]
    choices = wl.choices.get(name)
    if choices is not None and x not in choices:
        v.fail(at, f"expected one of {', '.join(map(str, choices))}, got {_kind(x)}")
    if isinstance(default, bool):
        if not isinstance(x, bool):
            v.fail(at, f"expected true or false, got {_kind(x)}")
    elif isinstance(default, int):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            v.fail(at, f"expected a positive integer, got {_kind(x)}")
    elif isinstance(default, str) and not isinstance(x, str):
        v.fail(at, f"expected a string, got {_kind(x)}")


def _within(v: _Validator, constraints, params: dict, provider_axes: set) -> bool:
    """Whether params meet every constraint; one that names another provider's axis does not apply."""
    for i, text, tree in constraints:
        try:
            if not _eval(tree, params):
                return False
        except KeyError as e:
            if e.args[0] not in provider_axes:
                v.fail(("constraints", i), f"{text!r} names {e.args[0]!r}, which is not an axis")
        except (TypeError, ArithmeticError, ValueError, RecursionError) as e:
            v.fail(("constraints", i), f"{text[:80]!r} cannot be evaluated ({_first_line(e)})")
    return True


def has_profile(path, name: str) -> bool:
    """Whether the sweep file defines profile `name` (False for an unreadable file: load says why)."""
    try:
        data = _Doc(Path(path), _read(Path(path))).data
    except SweepError:
        return False
    return isinstance(data, dict) and isinstance(data.get("profiles"), dict) and name in data["profiles"]
