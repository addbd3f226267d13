"""Sweep files: read one (bench.measure.sweep_yaml), validate every field, and expand the axes into
plain-data cases."""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import re
import reprlib
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from bench import assets, workloads
from bench.measure import constraint
from bench.measure.sweep_yaml import MAX_BYTES, Doc, SweepError, first_line, read_text
from bench.results.stats import THRESHOLD

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
    "hygiene": "full",  # full: fresh inputs every rep and re-checks; basic: the gate alone (docs/isolation.md)
}
HYGIENE = ("full", "basic")
COMPARE_DEFAULTS = {"threshold": THRESHOLD, "control": None}  # control: a provider (else the baseline)
# A sweep file is small; these bound what a hostile or broken one can cost before it is refused.
MAX_CASES = 100_000
# Expansion work is counted before it is done, in steps of about half a microsecond: a few seconds'
# worth at most. Making a point takes POINT_STEPS; checking a point with a provider's config takes
# COMBO_STEPS plus one per term of the constraints, excludes and filters.
MAX_STEPS = 5_000_000
POINT_STEPS, COMBO_STEPS = 8, 4
MAX_OPTIONS = 1000  # --set and --filter options together
MAX_SIZE = 2**31 - 1  # of an integer axis: a size, which kernels index with 32-bit integers
MAX_TEXT = 200  # characters of a string value of a provider's axis
TOP_KEYS = {"name", "workload", "baseline", "providers", "axes", "zip", "include", "exclude",
            "constraints", "timing", "tolerance", "compare", "profiles"}
PROFILE_KEYS = TOP_KEYS - {"name", "workload", "profiles"}
SET_KEYS = TOP_KEYS - {"workload", "profiles"}  # these two are read before --set applies
# The sweep name is part of the run directory's name: no separators, dots first, or control bytes.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Bounds (open or closed ends) of what the runner can carry out: a worker's result is waited for
# with poll(), whose millisecond timeout overflows past 24 days; a day is the most any wait needs.
TIMING_RANGES = {
    "warmup_ms": ("[", 0, 600_000, "]"),
    "min_reps": ("[", 1, 10_000_000, "]"),
    "max_reps": ("[", 1, 10_000_000, "]"),
    "max_time_s": ("(", 0, 86_400, "]"),
    "target_ci": ("(", 0, 1, ")"),
    "timeout_s": ("(", 0, 86_400, "]"),
}
POSITIVE = ("(", 0, 10**12, "]")
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


# ---- validation ------------------------------------------------------------------------------

class _Validator:
    def __init__(self, where):
        self.where = where  # key path -> 'file:line' (or what else names its source) for messages

    def fail(self, at: tuple, msg: str):
        key = ".".join(str(k)[:40] for k in at) or "(top level)"
        raise SweepError(f"{self.where(at)}: {key}: {msg}")

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

    def number(self, value, at, bounds=POSITIVE, integer=False):
        """A finite int (or, unless integer, float) within bounds: (end, low, high, end), each end
        '[' or ']' for a closed one and '(' or ')' for an open one."""
        what = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            self.fail(at, f"expected {what}, got {_kind(value)}")
        left, low, high, right = bounds
        if not ((low < value if left == "(" else low <= value)
                and (value < high if right == ")" else value <= high)):  # NaN fails both
            self.fail(at, f"expected {what} in {left}{low}, {high}{right}, got {_kind(value)}")
        return value


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60


def _kind(value) -> str:
    """A value for a message: its type and a short repr (reprlib stops at depth and length)."""
    return "nothing" if value is None else f"{type(value).__name__} {_REPR.repr(value)}"[:80]


def _clip(text: str) -> str:
    """Command-line text for a message: at most 80 characters of it."""
    return text[:80] + ("..." if len(text) > 80 else "")


def _size(x) -> int:
    """How many values a parsed value holds: the work of matching against it."""
    if isinstance(x, list):
        return 1 + sum(_size(y) for y in x)
    if isinstance(x, dict):
        return 1 + sum(1 + _size(y) for y in x.values())
    return 1


MERGED = ("axes", "timing", "tolerance", "compare")  # what a profile merges key by key


def _merge_profile(data: dict, profile: dict) -> dict:
    """A profile's axes, timing and tolerance are merged key by key; its other keys replace."""
    out = dict(data)
    for key, value in profile.items():
        if key in MERGED and isinstance(value, dict) \
                and isinstance(data.get(key), dict):
            out[key] = {**data[key], **value}
        else:
            out[key] = value
    return out


def _parse_override(text: str, flag: str) -> tuple[str, Any]:
    """key=value, the value parsed as YAML with the bounds of a sweep file (size, values, depth,
    aliases, tags), so a hostile one is refused in one line like a file would be."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SweepError(f"{flag} {_clip(text)}: expected key=value")
    if len(value) > MAX_BYTES:
        raise SweepError(f"{flag} {_clip(text)}: the value is longer than {MAX_BYTES >> 10} KiB")
    return key.strip(), Doc(f"{flag} {_clip(text)}", value, numbered=False).data


def _apply_set(data: dict, overrides: list[str], axis_names: set[str]) -> tuple[dict, dict]:
    """--set timing.max_time_s=1 / axes.seq_len=[128,256] / seq_len=128 (an axis, by its name).
    Returns the data and, for messages, which --set gave (or made the mapping at) each key path."""
    data, sets = json.loads(json.dumps(data, default=str)), {}
    for text in overrides:
        key, value = _parse_override(text, "--set")
        path = key.split(".")
        if len(path) == 1 and path[0] not in TOP_KEYS and path[0] in axis_names:
            path = ["axes", path[0]]
        if path[0] not in SET_KEYS or len(path) > 3:  # the deepest: tolerance.float16.rel
            raise SweepError(f"--set {_clip(text)}: '{key[:80]}' is neither a sweep key nor an axis "
                             f"(sweep keys: {', '.join(sorted(SET_KEYS))}; "
                             f"axes: {', '.join(sorted(axis_names))})")
        if path[0] == "axes" and len(path) == 2 and not isinstance(value, list):
            value = [value]
        node = data
        for i, part in enumerate(path[:-1]):
            if part not in node:
                sets[tuple(path[:i + 1])] = f"--set {_clip(text)}"
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SweepError(f"--set {_clip(text)}: '{part[:80]}' is not a mapping")
        node[path[-1]] = value
        sets[tuple(path)] = f"--set {_clip(text)}"
    return data, sets


class _Budget:
    """Expansion work, counted before it is done, so a sweep that would take minutes is refused at
    once with its count."""

    def __init__(self, v: _Validator):
        self.v, self.used = v, 0

    def spend(self, steps: int, at: tuple, what: str) -> None:
        self.used += steps
        if self.used > MAX_STEPS:
            self.v.fail(at, f"{what}: more than {MAX_STEPS:,} steps to expand; narrow the axes")


def _expand_axes(v: _Validator, axes: dict, zips: list, at: tuple, budget: _Budget) -> dict:
    """The cartesian product of the axes, where each zip group counts as one axis, as {the point's
    items: the point}: a point listed twice is there once. Its size is checked before any point of
    it is made."""
    grouped, groups = set(), []
    for gi, group in enumerate(zips):
        v.seq(group, at + (gi,))
        for name in group:
            if not isinstance(name, str) or name not in axes:
                v.fail(at + (gi,), f"'{str(name)[:40]}' is not an axis")
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
    count = math.prod(len(g) for g in groups)
    if count > MAX_CASES:
        v.fail(at[:-1] + ("axes",), f"the axes give {count:,} points, more than {MAX_CASES:,}")
    budget.spend(count * POINT_STEPS, at[:-1] + ("axes",), f"the axes give {count:,} points")
    points = (dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*groups))
    return {frozenset(p.items()): p for p in points}


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
    """Load, validate and expand a sweep file (or a built-in sweep's name: assets.sweep_file).
    Raises SweepError with one line on any problem."""
    path = assets.sweep_file(path)
    text = read_text(path)
    doc = Doc(path, text)
    v = _Validator(doc.where)
    data = v.mapping({} if doc.data is None else doc.data, (), TOP_KEYS)
    for key in ("workload", "baseline", "providers", "axes"):
        if key not in data:
            v.fail((), f"missing required key '{key}'")
    wl_name = v.string(data["workload"], ("workload",))
    try:
        wl = workloads.get(wl_name)
    except KeyError as e:  # workloads.WorkloadError: one line, unknown name or a spec that fails
        v.fail(("workload",), str(e))

    profiles = v.mapping(data.get("profiles") or {}, ("profiles",))
    for pname, pdata in profiles.items():
        v.mapping(pdata, ("profiles", pname), PROFILE_KEYS)
    if profile is not None and profile != "gpu" and profile not in profiles:
        raise SweepError(f"{path}: no profile '{profile[:80]}' "
                         f"(defined: {', '.join(map(str, profiles)) or 'none'})")
    from_profile = []  # the key paths whose values the profile gave: its lines name them
    if profile in profiles:
        data = _merge_profile(data, profiles[profile])
        from_profile = [(k, sub) if isinstance(v, dict) and k in MERGED else (k,)
                        for k, v in profiles[profile].items() for sub in (v if isinstance(v, dict) else [None])]
    if len(overrides) + len(filters) > MAX_OPTIONS:
        raise SweepError(f"more than {MAX_OPTIONS} --set and --filter options")
    data, sets = _apply_set(data, list(overrides), set(wl.defaults))

    def where(at: tuple) -> str:
        """The --set that gave the value at `at` (the one nearest it), else its file and line: in
        the profile applied, where that gave it."""
        key = max((key for key in sets if at[:len(key)] == key), key=len, default=None)
        if key is not None:
            return sets[key]
        given = any(at[:len(k)] == k for k in from_profile)
        return doc.where(("profiles", profile) + at if given else at)
    v = _Validator(where)
    name = data.get("name")
    if name is None and not NAME.fullmatch(path.stem):
        raise SweepError(f"{path}: the file name does not make a sweep name (letters, digits, '.', "
                         "'_' and '-'); give the sweep a name: line")
    if name is not None and not (isinstance(name, str) and NAME.fullmatch(name)):
        v.fail(("name",), f"expected 1 to 64 letters, digits, '.', '_' or '-', the first a letter "
               f"or digit, got {_kind(name)}")

    # providers
    prov_specs, names = [], set()
    for i, item in enumerate(v.seq(data["providers"], ("providers",))):
        at = ("providers", i)
        if isinstance(item, str):
            item = {"name": item}
        v.mapping(item, at, {"name", "axes", "zip", "module"})
        pname = v.string(item.get("name"), at + ("name",))
        module = item.get("module")
        if module is not None:
            v.string(module, at + ("module",))
            try:
                workloads.load_user_provider(module)
            except ValueError as e:
                v.fail(at + ("module",), first_line(e))
            except (Exception, SystemExit) as e:  # its module failed to import or exited, or lacks it
                v.fail(at + ("module",),
                       f"cannot load {module[:80]!r} ({type(e).__name__}: {first_line(e)})")
        elif pname not in wl.providers:
            v.fail(at + ("name",), f"unknown provider '{pname[:80]}' for workload {wl_name} "
                   f"(known: {', '.join(wl.providers)}; or give module: 'pkg.mod:factory')")
        if pname in names:
            v.fail(at + ("name",), f"provider '{pname[:80]}' is listed twice")
        names.add(pname)
        paxes = v.mapping(item.get("axes") or {}, at + ("axes",))
        for ax, values in paxes.items():
            v.string(ax, at + ("axes", ax))
            if ax in wl.defaults:
                v.fail(at + ("axes", ax), f"'{ax}' is a workload axis; provider axes must differ")
            for j, x in enumerate(v.seq(values, at + ("axes", ax))):
                _check_plain(v, x, at + ("axes", ax, j))
        pzip = v.seq(item.get("zip") or [], at + ("zip",), nonempty=False)
        prov_specs.append({"name": pname, "module": module, "axes": paxes, "zip": pzip, "at": at})
    baseline = v.string(data["baseline"], ("baseline",))
    if baseline not in names:
        v.fail(("baseline",), f"baseline '{baseline[:80]}' is not one of the providers")
    provider_axes = {ax for spec in prov_specs for ax in spec["axes"]}  # before --providers filters
    if providers is not None:
        unknown = [p for p in providers if p not in names]
        if unknown:
            raise SweepError(f"--providers: unknown provider(s) {', '.join(unknown)[:200]} "
                             f"(this sweep has: {', '.join(s['name'] for s in prov_specs)[:200]})")
        prov_specs = [s for s in prov_specs if s["name"] in providers]
    chosen_axes = {ax for spec in prov_specs for ax in spec["axes"]}

    # axes, checked against the workload's defaults for name, type and choices
    axes = v.mapping(data["axes"], ("axes",))
    for ax, values in axes.items():
        at = ("axes", ax)
        if ax not in wl.defaults:
            v.fail(at, f"unknown axis for workload {wl_name} (known: {', '.join(wl.defaults)})")
        for j, x in enumerate(v.seq(values, at)):
            _check_value(v, wl, ax, x, at + (j,))
    timing = {**TIMING_DEFAULTS, **v.mapping(data.get("timing") or {}, ("timing",), set(TIMING_DEFAULTS))}
    _check_timing(v, timing, ("timing",))
    tolerance = _check_tolerance(v, data.get("tolerance") or {}, ("tolerance",))
    compare = {**COMPARE_DEFAULTS,
               **v.mapping(data.get("compare") or {}, ("compare",), set(COMPARE_DEFAULTS))}
    v.number(compare["threshold"], ("compare", "threshold"))
    if compare["control"] is not None and v.string(compare["control"], ("compare", "control")) not in names:
        v.fail(("compare", "control"), f"control '{str(compare['control'])[:80]}' is not one of the providers")
    constraints = []
    for i, expr in enumerate(v.seq(data.get("constraints") or [], ("constraints",), nonempty=False)):
        try:
            constraints.append((i, expr, constraint.parse(v.string(expr, ("constraints", i)))))
        except (SyntaxError, ValueError) as e:
            v.fail(("constraints", i), f"bad expression {expr[:80]!r} "
                   f"({e.msg if isinstance(e, SyntaxError) else e})")

    # points: the product, plus include points, minus exclude rules, within the constraints; each
    # step's work is counted before it is done
    budget = _Budget(v)
    zips = v.seq(data.get("zip") or [], ("zip",), nonempty=False)
    points = _expand_axes(v, axes, zips, ("zip",), budget)
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
        free_zips = [g for g in zips if not any(n in rule for n in g)]
        more = _expand_axes(v, fixed_axes, free_zips, ("zip",), budget)
        points.update((k, p) for k, p in more.items() if k not in points)
        if len(points) > MAX_CASES:
            v.fail(at, f"the axes and include rules give more than {MAX_CASES:,} points")
    excludes = v.seq(data.get("exclude") or [], ("exclude",), nonempty=False)
    for i, rule in enumerate(excludes):
        v.mapping(rule, ("exclude", i))
    points = [{**wl.defaults, **p} for p in points.values()]

    filt = [(text, *_parse_override(text, "--filter")) for text in filters]
    shown = {}  # axis -> the values it takes, for filters that match none
    for text, key, want in filt:
        if key not in wl.defaults and key not in chosen_axes:
            raise SweepError(f"--filter {_clip(key)}: not an axis of this sweep")
        if key not in shown:
            budget.spend(len(points), ("axes",), f"--filter {_clip(text)} looks at {len(points):,} points")
            shown[key] = list(dict.fromkeys([p[key] for p in points if key in p]
                                            + [x for s in prov_specs for x in s["axes"].get(key, [])]))
        budget.spend(len(shown[key]) * _size(want), ("axes",), f"--filter {_clip(text)}")
        if not any(_same(x, want) for x in shown[key]):
            replaced = profile in profiles and key in (profiles[profile].get("axes") or {})
            raise SweepError(
                f"--filter {_clip(text)}: no case has it ({key} is {_REPR.repr(shown[key])}"
                + (f": the '{profile}' profile replaced {key}; --profile none keeps the sweep's own)"
                   if replaced else ")"))

    configs = [list(_expand_axes(v, s["axes"], s["zip"], s["at"] + ("zip",), budget).values())
               for s in prov_specs]
    terms = (sum(1 for _, _, tree in constraints for _ in ast.walk(tree))
             + sum(_size(r) for r in excludes) + sum(_size(want) for _, _, want in filt))
    n_configs = sum(map(len, configs))
    budget.spend(len(points) * n_configs * (COMBO_STEPS + terms), ("axes",),
                 f"{len(points):,} points x {n_configs:,} provider configs"
                 + (f", each checked against {terms:,} terms of the constraints, excludes and filters"
                    if terms else ""))
    cases = []
    for point in points:
        for spec, extras in zip(prov_specs, configs):
            for extra in extras:
                params = {**point, **extra}
                if any(_matches(params, r) for r in excludes):  # provider axes can be excluded too
                    continue
                if not _within(v, constraints, params, provider_axes) or not all(
                        _same(params.get(k), want) for _, k, want in filt if k in params):
                    continue
                if len(cases) >= MAX_CASES:
                    v.fail((), f"more than {MAX_CASES:,} cases")
                cases.append(Case(
                    case_id=_case_id(wl_name, spec["name"], params), workload=wl_name,
                    provider=spec["name"], baseline=baseline, params=params, shape=dict(point),
                    timing=dict(timing), tolerance=tolerance, module=spec["module"]))
    return Sweep(name=name or path.stem, path=str(path),
                 sha256=hashlib.sha256(text.encode()).hexdigest(), workload=wl_name,
                 baseline=baseline, profile=profile, compare=compare, cases=cases)


def _check_value(v: _Validator, wl, name: str, x, at: tuple) -> None:
    """A value the workload can take: one of its choices where it lists them, else of its default's
    type, where an integer is a size (1 to MAX_SIZE)."""
    default = wl.defaults[name]
    choices = wl.choices.get(name)
    if choices is not None:
        if not any(type(x) is type(c) and x == c for c in choices):
            v.fail(at, f"expected one of {', '.join(map(str, choices))}, got {_kind(x)}")
    elif isinstance(default, bool):
        if not isinstance(x, bool):
            v.fail(at, f"expected true or false, got {_kind(x)}")
    elif isinstance(default, int):
        v.number(x, at, ("[", 1, MAX_SIZE, "]"), integer=True)
    elif isinstance(default, str):
        if not isinstance(x, str):
            v.fail(at, f"expected a string, got {_kind(x)}")
    else:
        _check_plain(v, x, at)


def _check_plain(v: _Validator, x, at: tuple) -> None:
    """A plain value (null, true/false, a finite number or a short string), as a provider's own
    axes take: a case's parameters are compared, hashed and stored as JSON."""
    if isinstance(x, str):
        if len(x) > MAX_TEXT:
            v.fail(at, f"expected at most {MAX_TEXT} characters, got {len(x)}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        v.number(x, at, ("[", -10**12, 10**12, "]"))
    elif x is not None and not isinstance(x, bool):
        v.fail(at, f"expected null, true/false, a number or a string, got {_kind(x)}")


def _check_timing(v: _Validator, timing: dict, at: tuple) -> None:
    """Every key of TIMING_DEFAULTS, each within what the runner can carry out."""
    for key, value in timing.items():
        if key == "hygiene":
            if value not in HYGIENE:
                v.fail(at + (key,), f"expected one of {', '.join(HYGIENE)}, got {_kind(value)}")
        elif isinstance(TIMING_DEFAULTS[key], bool):
            if not isinstance(value, bool):
                v.fail(at + (key,), f"expected true or false, got {_kind(value)}")
        else:
            v.number(value, at + (key,), TIMING_RANGES[key], integer=key in ("min_reps", "max_reps"))
    if timing["min_reps"] > timing["max_reps"]:
        v.fail(at + ("min_reps",), "min_reps is larger than max_reps")
    if timing["warmup_ms"] / 1e3 + timing["max_time_s"] >= timing["timeout_s"]:
        v.fail(at + ("timeout_s",), f"{timing['timeout_s']:g} s leaves no time: warmup_ms and "
               "max_time_s alone take that long")


def _check_tolerance(v: _Validator, tolerance, at: tuple) -> dict:
    """dtype -> {max_abs, rel}, each a positive number."""
    for dt, tol in v.mapping(tolerance, at).items():
        v.mapping(tol, at + (dt,), {"max_abs", "rel"})
        for k, x in tol.items():
            v.number(x, at + (dt, k))
    return tolerance


def _within(v: _Validator, constraints, params: dict, provider_axes: set) -> bool:
    """Whether params meet every constraint; one that names another provider's axis does not apply."""
    for i, text, tree in constraints:
        try:
            if not constraint.evaluate(tree, params):
                return False
        except KeyError as e:
            if e.args[0] not in provider_axes:
                v.fail(("constraints", i), f"{text[:80]!r} names {e.args[0]!r}, which is not an axis")
        except (TypeError, ArithmeticError, ValueError, RecursionError) as e:
            v.fail(("constraints", i), f"{text[:80]!r} cannot be evaluated ({first_line(e)})")
    return True


def validate_cases(cases, path) -> list[Case]:
    """Check cases read back from a run's cases.json (a list of Case.to_dict()) by the rules load()
    applies to the cases it makes: every field there and of its type, a known workload and
    provider, axis values the workload takes, timing and tolerance within bounds, unique case ids.
    `path` names the file in messages. Returns the Cases; raises SweepError, one line, on the first
    problem, so a resumed run never starts on cases that cannot run."""
    v = _Validator(lambda at: str(path))
    v.seq(cases, (), nonempty=False)
    if len(cases) > MAX_CASES:
        v.fail((), f"more than {MAX_CASES:,} cases")
    keys, ids = [f.name for f in fields(Case)], set()
    for i, c in enumerate(cases):
        at = (i,)
        v.mapping(c, at, set(keys))
        for key in keys:
            if key not in c:
                v.fail(at, f"missing key '{key}'")
        case_id = v.string(c["case_id"], at + ("case_id",))
        if case_id in ids:
            v.fail(at + ("case_id",), f"case id '{case_id[:80]}' is listed twice")
        ids.add(case_id)
        try:
            wl = workloads.get(v.string(c["workload"], at + ("workload",)))
        except KeyError as e:  # workloads.WorkloadError: one line
            v.fail(at + ("workload",), str(e))
        provider = v.string(c["provider"], at + ("provider",))
        v.string(c["baseline"], at + ("baseline",))
        if c["module"] is not None:
            if ":" not in v.string(c["module"], at + ("module",)):
                v.fail(at + ("module",), f"expected 'module:function', got {_kind(c['module'])}")
        elif provider not in wl.providers:
            v.fail(at + ("provider",), f"unknown provider '{provider[:80]}' for workload {wl.name}")
        params = v.mapping(c["params"], at + ("params",))
        for k, x in params.items():
            if k in wl.defaults:
                _check_value(v, wl, k, x, at + ("params", k))
            else:
                v.string(k, at + ("params", k))
                _check_plain(v, x, at + ("params", k))
        for k in wl.defaults:
            if k not in params:
                v.fail(at + ("params",), f"missing axis '{k}'")
        for k, x in v.mapping(c["shape"], at + ("shape",)).items():
            if k not in params or params[k] != x:
                v.fail(at + ("shape", k), f"differs from params: {_kind(x)}")
        timing = v.mapping(c["timing"], at + ("timing",), set(TIMING_DEFAULTS))
        for key in TIMING_DEFAULTS:
            if key not in timing:
                v.fail(at + ("timing",), f"missing key '{key}'")
        _check_timing(v, timing, at + ("timing",))
        _check_tolerance(v, c["tolerance"], at + ("tolerance",))
    return [Case.from_dict(c) for c in cases]


def has_profile(path, name: str) -> bool:
    """Whether the sweep file defines profile `name` (False for an unreadable file: load says why)."""
    try:
        path = assets.sweep_file(path)
        data = Doc(path, read_text(path)).data
    except SweepError:
        return False
    return isinstance(data, dict) and isinstance(data.get("profiles"), dict) and name in data["profiles"]
