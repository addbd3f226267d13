"""The one worker program and the one case-execution function.

`python -m bench.measure.worker DEVICE` serves cases for every executor (the local pool, Dask,
A/B, tune, Nsight Compute): it reads one JSON request a line on stdin and answers each with one
record (bench.results.record) and the request's nonce on a private copy of its stdout; whatever a
case prints goes to `case.log` in the worker's working directory, a scratch directory of the
parent's. It exits after a case that left it changed (bench.measure.leaks), and the parent starts
a fresh one.

`run_case` judges a provider before it times it, on inputs it cannot spoil (docs/isolation.md):
the reference runs on pristine copies; the provider's inputs must be bit-identical after its call;
at hygiene `full`, timed reps read freshly drawn inputs, and one rep of every batch reads a held-out
set, never seen before, whose output is checked again.
"""
from __future__ import annotations

import builtins
import contextlib
import copy
import hashlib
import json
import os
import sys
import time
import traceback

import torch

from bench import workloads
from bench.cli import first_line
from bench.measure import check, env, leaks, timing
from bench.measure.sweep import Case
from bench.results.record import Record, tampered_reason, utc_now

# this module's own builtins; what run_case calls once a provider has run is bound as default
# arguments: a provider that replaced one of those names, even for a moment (putting the original
# back before its case ended), must not be timed or judged by its replacement (docs/isolation.md)
__builtins__ = dict(vars(builtins))

# What a parent reads in this file to know how to talk to it. 3: each request carries a nonce, which
# the answer repeats (2: no nonce; 1: trees from before this program).
PROTOCOL = 3
LOG = "case.log"
# One thread per CPU worker: with two, every op waits at a barrier for both, and on a shared machine
# a descheduled thread made whole runs' medians 100x slower (docs/regressions.md).
CPU_THREADS = 1


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _case_seed(case: Case) -> int:
    return int(hashlib.sha1(case.case_id.encode()).hexdigest()[:8], 16)


def _seed(device: torch.device, seed: int, _cpu=torch.default_generator) -> None:
    """Seed the generators inputs are drawn from, the CPU's and the case's GPU's, through the
    generators themselves: torch.manual_seed visits every backend (59 us on a CPU, against 1.6),
    and torch's compiler replaces it when it first loads. The CPU's is bound here; the GPU's, made
    when CUDA starts, is in the tamper check (bench.measure.leaks)."""
    _cpu.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.default_generators[torch.cuda.current_device() if device.index is None
                                      else device.index].manual_seed(seed)


def _secret_seed(device: torch.device, _urandom=os.urandom) -> None:
    """Seed them from the OS's randomness, bound here: a case can patch what `secrets` and `random`
    read it through, and would then know every later draw."""
    _seed(device, int.from_bytes(_urandom(8), "little") >> 1)


def _tensors(x, _flat=check._flat) -> list:
    """(name, tensor) of every tensor in a workload's inputs (dicts, lists, tuples, anything else
    skipped), in a fixed order."""
    return _flat(x, strict=False)


def _rebuild(x, leaf):
    """x's dicts, lists and tuples made anew, with leaf(t) in place of each tensor t."""
    def walk(x):
        if isinstance(x, torch.Tensor):
            return leaf(x)
        if isinstance(x, dict):
            return type(x)((k, walk(v)) for k, v in x.items())
        if isinstance(x, (list, tuple)):
            return type(x)(walk(v) for v in x)
        return x
    return walk(x)


# torch.Tensor's own methods, called through the class: a tensor a provider holds (its inputs, its
# outputs) can carry an attribute of the same name (`t.copy_ = ...`), which `t.copy_(...)` would call
_detach, _clone_tensor, _copy, _requires_grad = (torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.copy_,
                                                 torch.Tensor.requires_grad_)


def _copy_of(t, _detach=_detach, _clone_tensor=_clone_tensor, _requires_grad=_requires_grad):
    """A tensor with fresh storage holding t's bits (requires_grad kept)."""
    return _requires_grad(_clone_tensor(_detach(t)), t.requires_grad)


def _clone(x, _rebuild=_rebuild, _copy_of=_copy_of, _no_modes_left=timing.no_modes_left):
    """A copy of inputs with fresh storage for every tensor."""
    _no_modes_left()
    return _rebuild(x, _copy_of)


def _copy_output(out, mappings: tuple = (), _flat=check._flat, _copy_of=_copy_of,
                 _no_modes_left=timing.no_modes_left) -> dict:
    """A copy of what a provider returned, {name: tensor} as the gate names them, made after every
    rep alike: only plain tensors in plain tuples, lists and dicts, or the workload's own `mappings`
    (check._flat), so an output that would do its work only when the harness reads it is refused
    on the rep that returned it."""
    _no_modes_left()
    return {name: _copy_of(t) for name, t in _flat(out, mappings=mappings)}


def _load(dst, src, _tensors=_tensors, _grad=(torch.is_grad_enabled, torch._C._set_grad_enabled), _copy=_copy,
          _no_modes_left=timing.no_modes_left) -> None:
    """Copy src's tensors into dst's, without autograd: through torch's C setter, not torch.no_grad,
    a class whose methods a provider could replace to run its work as the load ends."""
    _no_modes_left()
    enabled, set_enabled = _grad
    was = enabled()
    set_enabled(False)
    try:
        for (_, d), (_, s) in zip(_tensors(dst), _tensors(src)):
            _copy(d, s)
    finally:
        set_enabled(was)


def _changed(work, pristine, _tensors=_tensors, _equal=torch.equal, _detach=_detach,
             _no_modes_left=timing.no_modes_left) -> list[str]:
    """Names of the input tensors whose bits differ from their pristine copy."""
    _no_modes_left()
    return [n for (n, w), (_, p) in zip(_tensors(work), _tensors(pristine))
            if w.shape != p.shape or not _equal(_detach(w), p)]


def provider_factory(case: Case):
    wl = workloads.get(case.workload)
    return workloads.load_user_provider(case.module) if case.module else wl.providers[case.provider]


def provider_fn(case: Case, work):
    """The provider's callable over `work`, built from a copy of the case's parameters: the harness
    draws inputs with its own, and a provider that shrank them would be timed on smaller ones."""
    return provider_factory(case)(copy.deepcopy(case.params), work)


class Inputs:
    """The inputs of one case: the set the provider's callable is bound to (`work`), pristine sets
    to refill it from, and their references, computed on copies the provider never sees. The
    harness loads and checks the work tensors through containers of its own (`mine`): what a
    provider puts in the containers it was given (a tensor of its own class, whose code would run
    on every load and see its source) is never touched."""

    def __init__(self, case: Case, device: torch.device):
        self.case, self.wl, self.device = case, workloads.get(case.workload), device
        _seed(device, _case_seed(case))  # the gate's set: the same in every run
        self.sets = [self.wl.make_inputs(case.params, device)]
        self.mine = _clone(self.sets[0])
        self.work = _rebuild(self.mine, lambda t: t)  # containers of its own, the same tensors
        self._refs: dict[int, object] = {}
        self.checked, self.loaded = 0, 0

    def hold_out(self, n: int) -> None:
        """Draw n held-out sets, then seed the generators afresh: their state tells nothing of them."""
        for _ in range(n):
            self.sets.append(self._draw())
        _secret_seed(self.device)

    def reference(self, i: int, _clone=_clone):
        if i not in self._refs:
            self._refs[i] = self.wl.reference(self.case.params, _clone(self.sets[i]))
        return self._refs[i]

    def _draw(self, _secret_seed=_secret_seed):
        """Inputs no provider can draw again, as it could those of a seed it can work out (the
        gate's is the case id's hash), and then know its check sets and store their outputs."""
        _secret_seed(self.device)
        return self.wl.make_inputs(self.case.params, self.device)

    def feed(self, check: bool, _draw=_draw, _load=_load, _no_modes_left=timing.no_modes_left) -> None:
        """Before a timed rep: a held-out set no rep has read, or inputs drawn afresh. Each held-out
        set is read once: one read again could be answered from a memo of the first time. Inputs
        are drawn either way, so that nothing a provider can see (the generators' state, the time
        between its calls) tells a checked rep from the others. Batches discarded by the timer can
        spend the sets drawn for the budget; one more is drawn then, its reference computed when
        it is judged."""
        _no_modes_left()
        drawn = _draw(self)
        self.loaded = None
        if check:
            self.checked += 1
            if self.checked == len(self.sets):
                self.sets.append(_draw(self))
            self.loaded = self.checked
        _load(self.mine, drawn if self.loaded is None else self.sets[self.loaded])

    def hold(self, out, _clone=_clone, _copy_output=_copy_output) -> tuple:
        """Right after a rep: which set it read, and copies of what it returned and of its inputs,
        before the next reps reuse the buffers."""
        return self.loaded, _copy_output(out, self.wl.outputs), _clone(self.mine)


def build(case: Case, device: torch.device):
    """(inputs, fn) for a case, as run_case builds them: the seeded inputs and the provider's
    callable over them."""
    x = Inputs(case, device)
    return x.work, provider_fn(case, x.work)


def _judge(out, ref, tol, mappings: tuple = (), _errors=check.errors, _passes=check.passes,
           _no_modes_left=timing.no_modes_left) -> tuple[dict, str | None]:
    _no_modes_left()
    err = _errors(out, ref, mappings)
    if _passes(err, tol):
        return err, None
    return err, (f"max abs error {err['max_abs']:.3g} (tolerance {tol['max_abs']:g}), "
                 f"relative error {err['rel']:.3g} (tolerance {tol['rel']:g})"
                 + (f", worst in {err['worst']}" if err.get("worst") else ""))


def run_case(case: Case, device: torch.device, _tamper_check=leaks.harness_changes,
             _measure=timing.measure, _first_call=timing.first_call, _judge=_judge,
             _changed=_changed, _load=_load, _inputs=(Inputs.feed, Inputs.hold, Inputs.reference),
             _env=(env.telemetry, env.clock_probe, env.mean_power_w, env.max_sm_clock_mhz),
             _now=time.perf_counter, _to_dict=Record.to_dict) -> dict:
    """Build inputs, check the provider against the reference, then time it, at the case's
    `timing.hygiene` level. Never raises. What it calls once the provider exists is bound here,
    where a case cannot rebind it."""
    rec = Record.blank(case, str(device))
    gpu = device.index if device.type == "cuda" else None
    with contextlib.suppress(Exception):  # resolved before the snapshot, which then holds its
        workloads.get(case.workload)      # functions; a name that does not resolve fails below
    clean = leaks.harness()
    hygiene = case.timing.get("hygiene", "full")
    rotate = hygiene == "full"
    try:
        wl = workloads.get(case.workload)
        rec.flops = float(wl.flops(case.params)) if wl.flops else None  # a numpy number too
        rec.bytes = float(wl.bytes(case.params)) if wl.bytes else None
        with timing.nvtx_range(f"case {case.case_id} {case.label}"):
            checked = rotate and wl.rotate
            x = Inputs(case, device)
            began = _now()
            x.reference(0)
            if checked:  # as many held-out sets as the budget has batches, but references cost
                x.hold_out(timing.checked_batches(case.timing["max_time_s"], _now() - began))
            for i in range(len(x.sets)):  # before the provider exists: nothing it patches reaches them
                x.reference(i)
            tol = check.tolerance_for(str(case.params.get("dtype", "float32")), case.tolerance)
            feed, hold, reference = _inputs
            telemetry, clock_probe, mean_power_w, max_sm_clock_mhz = _env
            fn = provider_fn(case, x.work)
            with timing.nvtx_range("check"):
                ref = reference(x, 0)
                _load(x.mine, x.sets[0])
                out, rec.first_call_ms, rec.extra_mib = _first_call(fn, device)
                err, wrong = _judge(out, ref, tol, wl.outputs)
                del out
                mutated = _changed(x.mine, x.sets[0])
            rec.max_abs_err, rec.rel_err, rec.tolerance = err["max_abs"], err["rel"], tol
            if mutated:
                rec.status, wrong = "incorrect", f"the provider changed its input {', '.join(mutated)} in place"
            elif wrong:
                rec.status = "incorrect"
            rec.reason = wrong or ""

            def verify(held, call="a timed rep"):
                """Why what `call` returned for a held-out set is wrong, or None."""
                i, out, work = held
                changed = _changed(work, x.sets[i])
                why = (f"the provider changed its input {', '.join(changed)} in place" if changed
                       else _judge(out, reference(x, i), tol)[1])
                return f"{call} on check set {i}: {why}" if why else None
            before = telemetry(gpu) if gpu is not None else None
            start = _now()
            result = _measure(fn, device, **case.timing,
                              feed=(lambda check: feed(x, check)) if checked else None,
                              hold=lambda out: hold(x, out),
                              verify=verify if checked and not wrong else None, batches=len(x.sets) - 1,
                              probe=clock_probe(gpu) if gpu is not None else None)
            seconds = _now() - start
            after = telemetry(gpu) if gpu is not None else None
            rec.samples_ms, rec.stop, rec.host_ms, rec.busy_ms = (
                result["samples_ms"], result["stop"], result["host_ms"], result["busy_ms"])
            rec.telemetry = ({"before": before, "after": after,
                              "mean_power_w": mean_power_w(before, after, seconds)}
                             if before or after else None)
            if result["clocks"]:
                rec.clocks = {**result["clocks"], "ref_mhz": max_sm_clock_mhz(gpu)}
            rec.hygiene = {"level": hygiene, "input_sets": len(x.sets), "fresh_inputs": checked,
                           "rechecked_reps": result["checked"], "hidden_ms": result["hidden_ms"],
                           "device_wide": result["device_wide"], "exposed_reps": result["exposed_reps"],
                           "spin_ms": result["spin_ms"], "unsettled_reps": result["unsettled_reps"],
                           "drift": result["drift"], "settled": result["settled"]}
            if result["failed"] and rec.status == "ok":
                rec.status, rec.reason = "incorrect", result["failed"]
            if result["device_wide"]:  # said beside, never instead of, why a case is incorrect
                rec.reason = "; ".join(filter(None, [
                    rec.reason, f"work ran outside the current stream ({result['hidden_ms']:.3g} ms "
                                "after a batch's last end event): every rep timed to a device-wide end"]))
            if result["still_moving"]:
                rec.reason = "; ".join(filter(None, [rec.reason, result["still_moving"]]))
    except workloads.Unavailable as e:
        rec.status, rec.reason = "skipped", str(e)
    except Exception as e:
        rec.status, rec.reason = ("oom" if _is_oom(e) else "error"), first_line(e)
        if rec.status == "error" and os.environ.get("BENCH_TRACEBACK"):
            traceback.print_exc()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    touched = _tamper_check(clean)
    if touched and rec.status not in ("skipped",):
        rec.status, rec.reason, rec.leaked = "tampered", tampered_reason(touched), {"harness": touched}
    rec.ended_utc = utc_now()
    return _to_dict(rec)


@contextlib.contextmanager
def captured(path: str):
    """Send everything written to stdout and stderr (by Python or by native code) to `path`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _json_codec():
    """(encode, decode) made of the json module's C parts, which no case can rebind. A case that
    replaced json.dumps, or a method of json's encoder, would otherwise rewrite what the worker
    answers after the tamper check has run: its own record, and every later one."""
    make, scanner = json.encoder.c_make_encoder, json.scanner.c_make_scanner
    if make is None or scanner is None:  # an interpreter without them: json's Python code
        return json.JSONEncoder(default=str).encode, json.JSONDecoder().decode
    chunks = make(None, str, json.encoder.c_encode_basestring_ascii, None, ": ", ", ", False, False, True)
    scan, join = scanner(json.JSONDecoder()), "".join
    return (lambda obj: join(chunks(obj, 0))), (lambda text: scan(text, 0)[0])


def serve(device_name: str, profiled: bool = False) -> None:
    """The worker's main loop: one request {"case": ..., "nonce": ...} a line on stdin, one answer
    {"nonce": ..., "record": ...} a line back, or {"nonce": ..., "tampered": [what]} for a case
    that replaced part of the harness (the parent writes its record: nothing made by that case's
    code is sent); stop at EOF, or after a case that left the process changed (its record says
    what, under `leaked`). The nonce is the parent's proof that an answer came from here: a case
    can write into the answer pipe, but cannot know what to repeat without reading this process's
    memory. What answers is bound here, in locals no case can reach: the codec, the pipe's write
    and the leak check. `profiled` (under Nsight Compute): autograd runs a backward on the calling
    thread, inside the NVTX ranges that aim the profiler, not on a thread of its own."""
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # nothing a case prints can reach the answers
    encode, decode = _json_codec()
    write, flush, changes = answer.write, answer.flush, leaks.changes
    if profiled:
        torch.autograd.set_multithreading_enabled(False)
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(CPU_THREADS)
    leaks.adopt_orphans()
    leaks.warm(device)
    if device.type == "cuda":  # busy_ms's profiler sets TORCHINDUCTOR_CACHE_DIR at its first use
        timing.busy_ms(lambda: torch.ones(1, device=device), device)
    clean = leaks.snapshot(device)
    write("ready\n")
    flush()
    for line in sys.stdin:
        request = decode(line)
        nonce = request.pop("nonce", None)
        with captured(LOG):
            record = run_case(Case.from_dict(request["case"]), device)
        leaked = changes(clean, device)
        # run_case's own check also sees a workload that case resolved first, which `clean` lacks
        tampered = leaked.get("harness") or (record["status"] == "tampered" and record["leaked"]["harness"])
        if tampered:
            write(encode({"nonce": nonce, "tampered": [str(k) for k in tampered]}) + "\n")
            flush()
            return
        record["leaked"] = leaked or None
        write(encode({"nonce": nonce, "record": record}) + "\n")
        flush()
        if record["leaked"]:
            return


if __name__ == "__main__":
    serve(sys.argv[1], "--profiled" in sys.argv[2:])
