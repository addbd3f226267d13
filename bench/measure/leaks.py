"""What a case can leave behind in its worker process: torch's global settings, host memory, CUDA
memory, the working directory, the environment, the functions the harness times and checks with,
and processes and Python threads the case started that still run. A worker compares them after
every case with what it saw when it started, and one that changed is replaced before the next
case, so no case's result depends on the case before it.

`harness` is the part a provider must not touch even during its own case: a case that replaced a
timing or checking function (or its code) is `tampered`, whatever its numbers say."""
from __future__ import annotations

import builtins
import gc
import importlib
import math
import os
import sys
import threading
import time

import psutil
import torch

from bench import workloads

# this module's own builtins, and what the checks call bound as default arguments: a case that
# replaced one of those names and put it back before its case ended must not be checked with it
__builtins__ = dict(vars(builtins))

# host memory a worker may grow by: allocator caches and lazy library init; on a GPU the libraries
# that load at their first use (cuDNN, NVRTC, Triton, the cuTile compiler's modules) add more: a
# worker on an H100 grew by 730 MB over its first cases with no leak, its CUDA context excluded
RSS_ALLOWANCE = {"cpu": 512 << 20, "cuda": 2 << 30}
CUDA_ALLOWANCE = 16 << 20  # CUDA memory still allocated after a case's tensors are gone


def settings() -> dict:
    """torch's process-wide settings that change how fast or how exactly the next case runs, or what
    the harness's own operations run through (a mode, a default device, anomaly checks, a profiler
    or a Python tracer left on: each made the cases after it slower on a CPU, 10-570%)."""
    cuda = torch.backends.cuda.matmul
    sdp = torch.backends.cuda
    return {
        "num_threads": torch.get_num_threads(),
        "num_interop_threads": torch.get_num_interop_threads(),
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "autocast_cuda": torch.is_autocast_enabled("cuda"),
        "default_dtype": str(torch.get_default_dtype()),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": cuda.allow_tf32,
        "cuda_matmul_allow_fp16_reduced_precision": cuda.allow_fp16_reduced_precision_reduction,
        "cudnn_enabled": torch.backends.cudnn.enabled,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "sdp_enabled": [sdp.flash_sdp_enabled(), sdp.mem_efficient_sdp_enabled(), sdp.math_sdp_enabled(),
                        sdp.cudnn_sdp_enabled()],
        "mkldnn_enabled": torch.backends.mkldnn.enabled,
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "default_device": str(torch.get_default_device()),
        "torch_function_modes": torch._C._len_torch_function_stack(),
        "torch_dispatch_modes": torch._C._len_torch_dispatch_stack(),
        "anomaly_detection": torch.is_anomaly_enabled(),
        "profiler": torch._C._autograd._profiler_enabled(),
        "python_tracer": [repr(sys.gettrace()), repr(sys.getprofile())],
        "dispatch_keys": [str(torch._C._dispatch_tls_local_include_set()),
                          str(torch._C._dispatch_tls_local_exclude_set())],
        "saved_tensor_hooks": torch._C._autograd._top_saved_tensors_default_hooks(False) is not None,
        # kernels registered for aten's ops from Python (torch.library): one for an op the next case's
        # reference runs would judge it (the tamper check covers the ops the harness runs itself)
        "aten_kernels": sorted(k for k in torch.library._impls if k.startswith("aten/") and not k.endswith("/Meta")),
        "gc": [gc.isenabled(), list(gc.get_threshold()), len(gc.callbacks)],
        "switch_interval": sys.getswitchinterval(),
    }


# modules whose functions time, check or record a case, compute the references it is judged
# against (the next case's are computed after this case's provider ran), or read the next case's
# request and find its workload and provider; their globals are compared one by one: functions
# by identity and code, data (a tolerance table, the hidden-work threshold) by value
HARNESS_MODULES = ("bench.measure.timing", "bench.measure.check", "bench.measure.worker",
                   "bench.measure.leaks", "bench.measure.env", "bench.results.stats",
                   "bench.results.record", "kernels.reference", "bench.workloads.providers",
                   "bench.measure.sweep", "bench.workloads")
WORKING_STATE = {"bench.workloads._loaded"}  # data the harness changes as it works (the workloads
# resolved so far, each compared on its own under "workload NAME")
# torch's namespaces that inputs are drawn (a held-out set looks like any other draw only while
# torch.randn is torch's) and references computed with
TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch.linalg", "torch.special", "torch.fft",
                    "torch.autograd")
_TORCH_DIR = os.path.dirname(torch.__file__)
GRAD_MODES = (torch.no_grad, torch.enable_grad, torch.inference_mode, torch.set_grad_enabled)
# the aten ops the harness runs on a provider's tensors once it exists (loading inputs, flushing L2,
# copying and judging outputs; tests/test_hostile.py holds the list to what those dispatch): a
# kernel a case registers for one of them (torch.library) runs in the harness's place, where it
# could make a wrong output read right, or do the provider's work untimed
JUDGED_OPS = ("aten::_local_scalar_dense", "aten::_to_copy", "aten::abs", "aten::all", "aten::amax",
              "aten::as_strided", "aten::clone", "aten::copy_", "aten::detach", "aten::empty",
              "aten::empty_strided", "aten::eq", "aten::equal", "aten::fill_", "aten::is_nonzero",
              "aten::is_same_size", "aten::isfinite", "aten::item", "aten::linalg_vector_norm", "aten::max",
              "aten::mul", "aten::ne", "aten::pow", "aten::result_type", "aten::select", "aten::square",
              "aten::sub", "aten::sum", "aten::to", "aten::unsqueeze", "aten::zero_")
_JUDGED = tuple(op for op in torch._C._dispatch_get_all_op_names() if op.split(".")[0] in JUDGED_OPS)


def _unwrapped_by_torch(f):
    """f, or what it wraps where torch's own code wraps it: torch's compiler replaces
    torch.manual_seed with a wrapper of it when it first loads. A wrapper of a case's is held."""
    while getattr(getattr(f, "__code__", None), "co_filename", "").startswith(_TORCH_DIR) \
            and hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f


_DATA = (int, float, str, bytes, tuple, frozenset, dict, list, set, type(None))


def _fn_id(f) -> tuple:
    code = getattr(f, "__code__", None)
    return id(f), id(code) if code is not None else None, hash(code) if code is not None else None


def _module(name: str):
    """The module `name` as this process runs it: __main__ for the worker program itself;
    otherwise imported here, so that none first appears in the middle of a case."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == name:
        return main
    return importlib.import_module(name)


def _harness(_fn_id=_fn_id, _module=_module, _import=importlib.import_module,
             _loaded=workloads.loaded, _dump=torch._C._dispatch_dump, _judged=_JUDGED) -> dict:
    """Identities of the clocks, CUDA timing calls, comparison ops and harness functions a case is
    measured and judged with; the values of the harness modules' data; the functions and providers
    of each workload resolved so far; NVML's calls, through which come the per-batch SM clock
    that times are normalised by and the throttle reasons that discard a batch; and the kernels
    torch's dispatcher holds for the ops the harness runs on a provider's tensors."""
    import torch.cuda

    objs = {"time.perf_counter": time.perf_counter, "time.perf_counter_ns": time.perf_counter_ns,
            "time.time": time.time, "time.monotonic": time.monotonic,
            "torch.cuda.synchronize": torch.cuda.synchronize, "torch.cuda.Event": torch.cuda.Event,
            "torch.cuda.Event.record": torch.cuda.Event.record,
            "torch.cuda.Event.elapsed_time": torch.cuda.Event.elapsed_time,
            "torch.cuda.Event.synchronize": torch.cuda.Event.synchronize,
            "torch.cuda._sleep": torch.cuda._sleep, "torch.cuda.current_stream": torch.cuda.current_stream,
            "torch.cuda.init": torch.cuda.init, "torch.default_generator": torch.default_generator}
    objs.update((f"torch.cuda.default_generators.{i}", g)
                for i, g in enumerate(torch.cuda.default_generators))
    for name in TORCH_NAMESPACES:
        objs.update((f"{name}.{k}", _unwrapped_by_torch(v)) for k, v in vars(_import(name)).items()
                    if callable(v))
    # torch.Tensor's own attributes, and any a case adds: one set there (`detach`, say) shadows the
    # C type's method for every tensor the gate reads (the C type's own cannot be set)
    objs.update((f"torch.Tensor.{k}", v) for k, v in vars(torch.Tensor).items())
    # the grad-mode classes' methods, through which the harness's references and a provider's loads
    # run (a replaced __exit__ runs its work as a no_grad block ends)
    objs.update((f"torch.{cls.__name__}.{k}", m) for grad_mode in GRAD_MODES for cls in grad_mode.__mro__
                if cls.__module__.startswith("torch") for k, m in vars(cls).items() if callable(m))
    try:
        import pynvml
        objs.update((f"pynvml.{k}", f) for k, f in vars(pynvml).items() if k.startswith("nvml") and callable(f))
    except ImportError:  # no NVML bindings: no readings to protect
        pass
    # the builtins and math functions the timer and the gate call (a `zip` that paired each start
    # event with itself would time every rep at zero); one a case adds shadows nothing
    objs.update((f"builtins.{k}", v) for k, v in vars(builtins).items() if callable(v))
    objs.update((f"math.{k}", v) for k, v in vars(math).items() if callable(v))
    for wname, wl in _loaded().items():  # what the next case of each is built and judged with
        objs.update({f"workload {wname}.{f}": getattr(wl, f)
                     for f in ("make_inputs", "reference", "flops", "bytes", "providers", "outputs")})
        objs.update((f"workload {wname}.providers.{p}", factory) for p, factory in wl.providers.items())
        objs.update((f"workload {wname}.outputs.{cls.__name__}.{k}", m)  # read as the gate judges
                    for cls in wl.outputs for k, m in vars(cls).items() if callable(m))
    values = {f"dispatch {op}": hash(_dump(op)) for op in _judged}
    for name in HARNESS_MODULES:
        module = _module(name)
        for attr, v in vars(module).items():
            if callable(v):  # its own, and those it bound from elsewhere (the timer's clocks)
                objs[f"{name}.{attr}"] = v
                if isinstance(v, type) and v.__module__ == module.__name__:  # methods a case could replace
                    objs.update((f"{name}.{attr}.{k}", m) for k, m in vars(v).items())
            elif isinstance(v, _DATA) and not attr.startswith("__") and f"{name}.{attr}" not in WORKING_STATE:
                values[f"{name}.{attr}"] = repr(v)
        own = vars(module).get("__builtins__")
        if isinstance(own, dict) and own is not vars(builtins):  # the module's own copy of them
            objs.update((f"{name}.__builtins__.{k}", v) for k, v in own.items() if callable(v))
    return {**{k: _fn_id(f) for k, f in objs.items()}, **values}


def harness(_harness=_harness) -> dict:
    """`_harness` without the cyclic garbage collector, which its thousands of small tuples would
    otherwise wake to scan torch's objects: 1.4 against 7.3 ms a call on a 2-core CPU."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _harness()
    finally:
        if collecting:
            gc.enable()


# keys of `harness` that may be new without a case having changed anything: a workload first
# resolved, a builtin, math or torch function a case added (nothing the harness calls is found
# there), the GPUs' generators once CUDA starts; but not an attribute added to torch.Tensor
NEW_IS_NOT_CHANGED = ("workload ", "builtins.", "math.", "torch.")
NEW_IS_CHANGED = ("torch.Tensor.",)


def harness_changes(clean: dict, _harness=harness) -> list[str]:
    """Names of the harness's functions that are not what they were in `clean`; a workload first
    resolved since is new, not changed. `harness` is bound here, where a case cannot rebind it."""
    now = _harness()
    return sorted(k for k in clean.keys() | now.keys() if clean.get(k) != now.get(k) and (
        k in clean or not k.startswith(NEW_IS_NOT_CHANGED) or k.startswith(NEW_IS_CHANGED)))



def adopt_orphans() -> None:
    """Make this process the reaper of its descendants (Linux), so that a process a case started is
    still found after its own parent exits or it starts a session of its own."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def end_children(keep: frozenset = frozenset(), _process=psutil.Process, _wait=psutil.wait_procs) -> int:
    """Kill every descendant of this process but `keep` (pids), and reap them; how many there were.
    A case's child must not outlive it: it could hold the worker's pipes, or run beside the next
    case."""
    procs = [p for p in _process().children(recursive=True) if p.pid not in keep]
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    _wait(procs, timeout=5)
    return len(procs)


def threads(_enumerate=threading.enumerate, _dummy=threading._DummyThread,
            _frames=sys._current_frames) -> frozenset:
    """Python threads alive now: those `threading` started, and any other running Python code (one
    from `_thread`), but not the entries `threading` makes for threads it did not start (autograd's
    device threads, once they have run a Python backward). A case's thread that outlives it could
    run beside the next case, or patch the harness while that case runs."""
    named = (t.ident for t in _enumerate() if not isinstance(t, _dummy))
    return frozenset(named) | frozenset(_frames())


def warm(device: torch.device) -> None:
    """Create the CUDA context and cuBLAS's handle before the clean snapshot, so that the first
    case's share of them (several hundred MB of host memory) is not counted as its leak."""
    if device.type == "cuda":
        a = torch.ones(64, 64, device=device)
        (a @ a).sum().item()


def snapshot(device: torch.device, _settings=settings, _threads=threads, _harness=harness,
             _process=psutil.Process, _getcwd=os.getcwd, _environ=os.environ) -> dict:
    """The state to compare against: settings, host RSS and CUDA memory allocated, the latter once
    reference cycles (a captured graph and the closures around it) are collected."""
    gc.collect()
    cuda = 0
    if device.type == "cuda":
        # cuBLAS keeps a 32 MB workspace per stream it has seen in torch's allocator: torch's own,
        # not a case's (on an H100 every case that used a new stream "leaked" 32 MB of it)
        getattr(torch._C, "_cuda_clearCublasWorkspaces", lambda: None)()
        cuda = torch.cuda.memory_allocated(device)
    return {"settings": _settings(), "rss": _process().memory_info().rss, "cuda": cuda,
            "cwd": _getcwd(), "environ": dict(_environ), "harness": _harness(),
            "children": frozenset(p.pid for p in _process().children(recursive=True)),
            "threads": _threads()}


def changes(clean: dict, device: torch.device, _harness_changes=harness_changes,
            _end_children=end_children, _snapshot=snapshot) -> dict:
    """{what: [then, now]} for everything that differs from `clean` beyond its allowance. Processes
    the case left running are ended first (a compile server too: the fresh worker starts its own)."""
    ended = _end_children(clean["children"])
    now = _snapshot(device)
    out = {k: [v, now["settings"][k]] for k, v in clean["settings"].items() if now["settings"][k] != v}
    if now["rss"] - clean["rss"] > RSS_ALLOWANCE[device.type]:
        out["rss_mb"] = [clean["rss"] >> 20, now["rss"] >> 20]
    if now["cuda"] - clean["cuda"] > CUDA_ALLOWANCE:
        out["cuda_allocated_mb"] = [clean["cuda"] >> 20, now["cuda"] >> 20]
    if now["cwd"] != clean["cwd"]:
        out["cwd"] = [clean["cwd"], now["cwd"]]
    env = sorted(k for k in clean["environ"].keys() | now["environ"].keys()
                 if clean["environ"].get(k) != now["environ"].get(k))
    if env:
        out["environ"] = env
    if ended:
        out["processes"] = [0, ended]
    if now["threads"] - clean["threads"]:
        out["threads"] = [len(clean["threads"]), len(now["threads"])]
    funcs = _harness_changes(clean["harness"])
    if funcs:
        out["harness"] = funcs
    return out
