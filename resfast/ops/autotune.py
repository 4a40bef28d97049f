"""``backend="auto"``: the fastest measured backend per call signature, remembered on disk.

For a call signature it has not seen (the op, the device, the dtype, the strides class and
every shape and argument that changes which kernel runs: see :func:`bn_relu_conv2d_backend`
and :func:`dense_block_backend`), ``auto`` measures every backend that can run on the device
(:func:`candidate_backends`: CUDA: eager, triton, native; the CPU: eager alone) on scratch
tensors of the same shape and strides, forward and, when gradients are needed, forward and
backward, and uses the winner from then on. The choices persist across processes in a JSON
file (:func:`cache_path`), keyed by the device's name and the torch, triton and resfast
versions.

How a candidate is measured (:func:`measure`): eager first (the reference and the
tie-breaker), then the others in the static order. Each gets a warm-up call, then timed
calls (each between two device synchronisations) until :attr:`TuneConfig.max_reps`, or
until the time budget is spent (after :attr:`TuneConfig.min_reps` calls, or one call that
alone exceeds the budget); its time is its fastest call. A candidate is abandoned as soon
as it is clearly slower than the best so far (:attr:`TuneConfig.abandon_factor`). On the
CPU the warm-up call already counts, and every candidate first runs a small version of the
call (batch 1, at most 2 x 2 output positions and 32 channels); those slower than
:attr:`TuneConfig.probe_factor` x the best small call are dropped, so that the C++ test
twin on a large CPU shape costs one small call, not seconds, and when one candidate is left
it wins without any full-size timing (:attr:`Measurement.probe_ms`). A candidate that raises is skipped
with its reason recorded. Eager wins whenever it is within :attr:`TuneConfig.tie_margin`
of the fastest: ``auto`` is never slower than plain PyTorch by more than the measuring
noise.

Precedence: an explicit ``backend=`` or ``RESFAST_BACKEND`` skips measuring;
``RESFAST_AUTOTUNE=0`` turns it off (the static order of :mod:`resfast.backends` applies).
Nothing is measured while ``torch.compile`` traces (the cached choice is used, else the
static order; the lookup is a constant for the tracer, so there is no graph break), while a
CUDA graph is captured, under ``torch.jit`` tracing, a ``TorchDispatchMode`` (fake tensors,
memory or FLOP counters) or a functorch transform: run one eager step first, or
``resfast tune``.

Measuring never touches the caller's tensors, running statistics or RNG stream: scratch
tensors are filled under :func:`torch.random.fork_rng`, gradients go through
``torch.autograd.grad`` to scratch leaves (never into a parameter's ``.grad``), and the
scratch graph saves its tensors plainly even inside a checkpointed function.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import has_static_value

from resfast.backends import backend_status, resolve_backend, static_order

__all__ = [
    "TuneConfig",
    "CONFIG",
    "Measurement",
    "autotune_enabled",
    "bn_relu_conv2d_backend",
    "cache_path",
    "cache_summary",
    "candidate_backends",
    "clear_memory_cache",
    "dense_block_backend",
    "measure",
    "pick_backend",
    "record_choices",
    "signature_dict",
]

ENV_AUTOTUNE = "RESFAST_AUTOTUNE"
ENV_CACHE_DIR = "RESFAST_CACHE_DIR"
CACHE_FILE = "autotune.json"
CACHE_FORMAT = 1

#: A call signature: ``((name, value), ...)`` with hashable, JSON-friendly values.
Signature = Tuple[Tuple[str, object], ...]
Runner = Callable[[], None]
#: ``make_runner(backend, small)``: builds scratch tensors (untimed) and returns a function
#: that runs the call once (forward, plus backward when gradients are needed); ``small``: the
#: probe's version of the call (batch 1, few output positions), else the call's own shape.
MakeRunner = Callable[[str, bool], Runner]


@dataclass
class TuneConfig:
    """How candidates are measured (module-wide: :data:`CONFIG`)."""

    #: Untimed calls before the timed ones (Triton compiles, cuDNN picks its algorithm).
    warmup: int = 1
    #: At least this many timed calls per candidate that is not abandoned.
    min_reps: int = 2
    #: At most this many timed calls per candidate.
    max_reps: int = 10
    #: Timed calls stop once this many seconds went into them (after ``min_reps`` calls,
    #: or one call that alone takes longer).
    budget_s: float = 0.05
    #: A candidate is abandoned once its fastest call so far is this many times the best's.
    abandon_factor: float = 1.5
    #: On the CPU, probe each candidate on the small call first (see :data:`MakeRunner`).
    probe: bool = True
    #: At the probe a candidate is abandoned at this many times the best's probe.
    probe_factor: float = 3.0
    #: Eager wins when it is within this fraction of the fastest candidate.
    tie_margin: float = 0.05
    #: The clock, in seconds (``None``: ``time.perf_counter``); tests inject a fake one.
    timer: Optional[Callable[[], float]] = None


CONFIG = TuneConfig()


@dataclass
class Measurement:
    """What :func:`measure` found: the winner, each finished candidate's fastest call in
    milliseconds, and why each other candidate was skipped or abandoned."""

    backend: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    skipped: Dict[str, str] = field(default_factory=dict)
    #: On the CPU: each probed candidate's faster call of the small probe call, in ms. When
    #: the probe leaves one candidate it wins without full-size timing (``times_ms`` empty).
    probe_ms: Dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- precedence


def autotune_enabled() -> bool:
    """False when ``RESFAST_BACKEND`` names a backend (other than ``auto``) or
    ``RESFAST_AUTOTUNE`` is ``0`` / ``false`` / ``off`` / ``no``: ``auto`` then follows the
    static order without measuring."""
    env = os.environ.get("RESFAST_BACKEND", "").strip()
    if env and env != "auto":
        return False
    return os.environ.get(ENV_AUTOTUNE, "1").strip().lower() not in ("0", "false", "off", "no")


def candidate_backends(device: Union[torch.device, str]) -> Tuple[str, ...]:
    """The backends ``auto`` measures on ``device``: eager first, then those of the static
    order that can run there.

    On the CPU that is eager alone, so nothing is measured: native there is the C++ twin of
    the CUDA kernels (their warp fragments emulated, to test the GPU's indexing), 100-1000x
    slower than eager at real sizes, and its small-call probe does not tell that (per-call
    overhead dominates small calls: 1.2-3x eager's), so a full-size trial call was needed to
    rule it out, up to 9 s each: densenet121's first training step at batch 8, 224x224 on a
    2-core CPU took 75 s with native measured, 1.8 s without, and native never won. Triton
    runs on CPU tensors only through its interpreter. :func:`measure` itself takes any list
    (the tests time eager against native on the CPU with it)."""
    dt = torch.device(device).type
    if dt == "cpu":
        return ("eager",)
    status = backend_status(dt)
    names = ["eager"]
    for name in static_order(dt):
        if name not in names and not status.get(name, "unknown") and not (name == "triton" and dt != "cuda"):
            names.append(name)
    return tuple(names)


def static_choice(device: Union[torch.device, str]) -> str:
    return resolve_backend("auto", device)


# ----------------------------------------------------------------------------- measuring


def _syncer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure(candidates: Sequence[str], make_runner: MakeRunner, *,
            device: Union[torch.device, str] = "cpu", timer: Optional[Callable[[], float]] = None,
            config: Optional[TuneConfig] = None) -> Measurement:
    """Time each of ``candidates`` with ``make_runner(name, False)()`` and pick the winner.

    Args:
        candidates: backend names, eager first (see :func:`candidate_backends`).
        make_runner: ``make_runner(name, small)`` builds scratch tensors (untimed) and
            returns a function running the call once, on the probe's small version of the
            call when ``small``.
        device: where the calls run (CUDA is synchronised around each timed call).
        timer: the clock, in seconds (default ``config.timer``, else ``time.perf_counter``).
        config: measuring parameters (default :data:`CONFIG`).

    Returns:
        a :class:`Measurement`; when every candidate raised, ``backend`` is the first
        candidate and ``times_ms`` and ``probe_ms`` are empty.
    """
    cfg = config or CONFIG
    timer = timer or cfg.timer or time.perf_counter
    device = torch.device(device)
    sync = _syncer(device)
    cpu = device.type == "cpu"
    probe = cpu and cfg.probe
    times: Dict[str, float] = {}
    skipped: Dict[str, str] = {}
    probes: Dict[str, float] = {}
    best_name: Optional[str] = None
    best = math.inf

    def once(run: Runner) -> float:
        sync()
        t0 = timer()
        run()
        sync()
        return timer() - t0

    def probe_time(name: str, stop_above: float = math.inf) -> float:
        """The faster of two calls of the small call; one when the first is above ``stop_above``."""
        if name not in probes:
            run = make_runner(name, True)
            t = once(run)
            probes[name] = t if t > stop_above else min(t, once(run))
        return probes[name]

    if probe and len(candidates) > 1:
        # Every candidate on the small call first (the first, eager, is the yardstick); those
        # over probe_factor x the best small call are dropped without a full-size call. When
        # one is left it wins: nothing is timed at full size (on a 2-core CPU a full-size
        # eager call of densenet121's layers costs tens of ms each, for a choice already made).
        try:
            probe_time(candidates[0])
        except Exception:  # the small call is not valid for this op: measure at full size
            probe = False
    if probe and len(candidates) > 1:
        best_probe = probes[candidates[0]]
        for name in candidates[1:]:
            try:
                mine = probe_time(name, cfg.probe_factor * best_probe)
            except Exception as exc:
                skipped[name] = _raised(exc)
                continue
            best_probe = min(best_probe, mine)
        for name in candidates:
            if name in probes and name not in skipped and probes[name] > cfg.probe_factor * best_probe:
                best_probe_name = min(probes, key=probes.get)
                skipped[name] = (f"abandoned at the small probe: {probes[name] * 1e3:.3g} ms against "
                                 f"{best_probe_name}'s {best_probe * 1e3:.3g} ms")
        left = [n for n in candidates if n in probes and n not in skipped]
        probe_ms = {k: v * 1e3 for k, v in probes.items()}
        if len(left) == 1:
            return Measurement(left[0], {}, skipped, probe_ms)
        candidates = left

    for name in candidates:
        try:
            run = make_runner(name, False)
            abandoned = ""
            for _ in range(cfg.warmup):
                t = once(run)
                if cpu and t > cfg.abandon_factor * best:
                    abandoned = f"abandoned after a warm-up call of {t * 1e3:.3g} ms against {best_name}'s " \
                                f"{best * 1e3:.3g} ms"
                    break
            fastest = math.inf
            if not abandoned:
                spent, reps = 0.0, 0
                while reps < max(1, cfg.max_reps):
                    t = once(run)
                    reps += 1
                    spent += t
                    fastest = min(fastest, t)
                    if fastest > cfg.abandon_factor * best:
                        abandoned = f"abandoned after {reps} timed call(s), fastest {fastest * 1e3:.3g} ms " \
                                    f"against {best_name}'s {best * 1e3:.3g} ms"
                        break
                    if spent >= cfg.budget_s and (reps >= cfg.min_reps or t >= cfg.budget_s):
                        break
            del run
            if abandoned:
                skipped[name] = abandoned
                continue
            times[name] = fastest * 1e3
            if fastest < best:
                best, best_name = fastest, name
        except Exception as exc:  # a candidate that cannot run this call is skipped, and says why
            skipped[name] = _raised(exc)
    probe_ms = {k: v * 1e3 for k, v in probes.items()}
    if not times:
        return Measurement(candidates[0] if candidates else "eager", {}, skipped, probe_ms)
    fastest_name = min(times, key=times.get)
    winner = fastest_name
    if "eager" in times and times["eager"] <= (1.0 + cfg.tie_margin) * times[fastest_name]:
        winner = "eager"
    return Measurement(winner, times, skipped, probe_ms)


def _raised(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"raised {type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# ----------------------------------------------------------------------------- may we measure here?

_LOCAL = threading.local()


def _may_measure(device: torch.device) -> bool:
    """False wherever a measurement would be wrong or observed: inside another measurement,
    under torch.jit tracing, a TorchDispatchMode, a functorch transform, or while a CUDA
    graph is being captured; and on devices other than the CPU and CUDA."""
    if device.type not in ("cpu", "cuda") or getattr(_LOCAL, "measuring", False):
        return False
    if torch.jit.is_tracing():
        return False
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        if _get_current_dispatch_mode() is not None:
            return False
    except ImportError:  # pragma: no cover - older torch
        pass
    try:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return False
    except AttributeError:  # pragma: no cover - older torch
        pass
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    try:
        if not torch._C._autograd._saved_tensors_hooks_is_enabled():
            return False
    except AttributeError:  # pragma: no cover - older torch
        pass
    return True


@contextlib.contextmanager
def _measuring(device: torch.device) -> Iterator[None]:
    """Scratch work: the caller's RNG streams restored afterwards, the scratch graph's saved
    tensors kept plainly (not by an enclosing checkpoint's hooks), no nested measuring."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    _LOCAL.measuring = True
    try:
        with torch.random.fork_rng(devices=devices), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            yield
    finally:
        _LOCAL.measuring = False


# ----------------------------------------------------------------------------- the cache

_WARNED: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def cache_path() -> str:
    """The cache file: ``$RESFAST_CACHE_DIR/autotune.json``, else
    ``$XDG_CACHE_HOME/resfast/autotune.json``, else ``~/.cache/resfast/autotune.json``."""
    folder = os.environ.get(ENV_CACHE_DIR, "").strip()
    if not folder:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(xdg, "resfast")
    return os.path.join(folder, CACHE_FILE)


def _cache_env() -> Tuple[Optional[str], Optional[str]]:
    return os.environ.get(ENV_CACHE_DIR), os.environ.get("XDG_CACHE_HOME")


_CPU_NAME: Optional[str] = None
_CUDA_NAMES: Dict[int, str] = {}
_VERSIONS: Optional[str] = None


def _cpu_name() -> str:
    global _CPU_NAME
    if _CPU_NAME is None:
        name = ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.lower().startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        _CPU_NAME = name or platform.processor() or platform.machine() or "unknown CPU"
    return _CPU_NAME


def _versions() -> str:
    global _VERSIONS
    if _VERSIONS is None:
        try:
            from importlib.metadata import version

            triton = version("triton")
        except Exception:  # not installed, or no metadata
            triton = "none"
        from resfast._version import __version__

        _VERSIONS = f"torch {torch.__version__} | triton {triton} | resfast {__version__}"
    return _VERSIONS


def _device_key(device_type: str, index: int) -> str:
    """Which machine a choice was measured on: the GPU's name, or the CPU's model and the
    number of threads torch uses; and the torch, triton and resfast versions."""
    if device_type == "cuda":
        if index < 0:
            index = torch.cuda.current_device()
        if index not in _CUDA_NAMES:
            _CUDA_NAMES[index] = torch.cuda.get_device_name(index)
        name = f"cuda: {_CUDA_NAMES[index]}"
    elif device_type == "cpu":
        name = f"cpu: {_cpu_name()} ({torch.get_num_threads()} threads)"
    else:
        name = device_type
    return f"{name} | {_versions()}"


def _entry_key(op: str, signature: Signature) -> str:
    return f"{op} {json.dumps([list(p) for p in signature], separators=(',', ':'))}"


def signature_dict(signature: Signature) -> Dict[str, object]:
    """A signature as a ``{name: value}`` dict (tuples as lists), as the cache and
    ``resfast tune --json`` show it."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in signature}


class _Cache:
    """The in-memory copy of the cache file plus a fast map for the hot path."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.path: Optional[str] = None
        self.env: Optional[Tuple[Optional[str], Optional[str]]] = None  # what cache_path() was computed from
        self.stamp: Optional[Tuple[float, int]] = None
        self.data: Dict[str, Dict[str, dict]] = {}  # device key -> entry key -> entry
        self.fast: Dict[Tuple[str, Signature, str], str] = {}

    def clear(self) -> None:
        with self.lock:
            self.path, self.env, self.stamp, self.data, self.fast = None, None, None, {}, {}

    # -- file access
    @staticmethod
    def _stamp(path: str) -> Optional[Tuple[float, int]]:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    @staticmethod
    def _read(path: str) -> Dict[str, Dict[str, dict]]:
        """The file's choices; ``{}`` when it is missing, and (with one warning) when it is
        unreadable or not a cache file: it is rewritten at the next measurement."""
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or not isinstance(doc.get("choices"), dict):
                raise ValueError("not a resfast autotune cache")
            data = {}
            for dev, entries in doc["choices"].items():
                if not isinstance(entries, dict):
                    raise ValueError("not a resfast autotune cache")
                data[dev] = {k: e for k, e in entries.items()
                             if isinstance(e, dict) and isinstance(e.get("backend"), str)}
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            _warn_once(f"corrupt:{path}", f"resfast autotune: ignoring the unreadable cache file {path} "
                                          f"({type(exc).__name__}: {exc}); it will be rewritten")
            return {}

    def sync(self) -> None:
        """Load the file when the path changed or another process rewrote it."""
        env, path = _cache_env(), cache_path()
        stamp = self._stamp(path)
        if path == self.path and stamp == self.stamp:
            self.env = env
            return
        data = self._read(path)
        if path == self.path:
            for dev, entries in self.data.items():  # keep what this process measured
                merged = data.setdefault(dev, {})
                for k, e in entries.items():
                    merged.setdefault(k, e)
        self.path, self.stamp, self.data, self.env = path, stamp, data, env
        self.fast = {}

    def get(self, op: str, signature: Signature, device_key: str) -> Optional[str]:
        with self.lock:
            hit = self.fast.get((op, signature, device_key))
            if hit is not None and self.env == _cache_env():
                return hit
            self.sync()
            entry = self.data.get(device_key, {}).get(_entry_key(op, signature))
            if entry is None:
                return None
            self.fast[(op, signature, device_key)] = entry["backend"]
            return entry["backend"]

    def remember(self, op: str, signature: Signature, device_key: str, backend: str) -> None:
        """Use ``backend`` for the signature in this process, without writing it to the file."""
        with self.lock:
            self.fast[(op, signature, device_key)] = backend

    def entry(self, op: str, signature: Signature, device_key: str) -> Optional[dict]:
        with self.lock:
            return self.data.get(device_key, {}).get(_entry_key(op, signature))

    def put(self, op: str, signature: Signature, device_key: str, entry: dict) -> None:
        """Remember ``entry`` and merge it into the file: under an exclusive lock, the file is
        read, this process's choices are added, and the result replaces the file atomically."""
        with self.lock:
            self.sync()
            self.data.setdefault(device_key, {})[_entry_key(op, signature)] = entry
            self.fast[(op, signature, device_key)] = entry["backend"]
            path = self.path or cache_path()
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with _file_lock(path + ".lock"):
                    data = self._read(path)
                    for dev, entries in self.data.items():
                        data.setdefault(dev, {}).update(entries)
                    _atomic_write(path, {"format": CACHE_FORMAT, "choices": data})
                    self.data, self.stamp = data, self._stamp(path)
            except OSError as exc:
                _warn_once(f"write:{path}", f"resfast autotune: cannot write the cache file {path} "
                                            f"({exc.strerror or exc}); choices are kept for this process only "
                                            f"(set {ENV_CACHE_DIR} to a writable folder)")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: the atomic rename still keeps the file whole
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: str, doc: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json.tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


_CACHE = _Cache()


def clear_memory_cache() -> None:
    """Forget this process's in-memory choices (the file stays); the next lookup reads it."""
    _CACHE.clear()


def cache_summary() -> Dict[str, object]:
    """The cache file, whether it exists, how many choices it holds in all and how many for
    this machine (its CPU, or its first GPU, with the versions installed here), and whether
    ``auto`` measures at all (``RESFAST_BACKEND`` / ``RESFAST_AUTOTUNE``)."""
    path = cache_path()
    data = _Cache._read(path) if os.path.exists(path) else {}
    here = [_device_key("cpu", -1)]
    if torch.cuda.is_available():
        here.append(_device_key("cuda", 0))
    return {
        "file": path,
        "exists": os.path.exists(path),
        "choices": sum(len(v) for v in data.values()),
        "choices_here": sum(len(data.get(k, {})) for k in here),
        "measuring": autotune_enabled(),
    }


# ----------------------------------------------------------------------------- recording (resfast tune)

_RECORDERS: List[Dict[str, dict]] = []


@contextlib.contextmanager
def record_choices() -> Iterator[List[dict]]:
    """Collect, in call order, one ``{"op", "signature", "backend", "times_ms", "skipped"}``
    per distinct call signature that ``auto`` resolves (measured now or found in the cache)
    while the block runs."""
    seen: Dict[str, dict] = {}
    rows: List[dict] = []
    _RECORDERS.append(seen)
    try:
        yield rows
    finally:
        _RECORDERS.remove(seen)
        rows.extend(seen.values())


def _record(op: str, signature: Signature, backend: str, entry: Optional[dict]) -> None:
    for seen in _RECORDERS:
        key = _entry_key(op, signature)
        if key not in seen:
            seen[key] = {"op": op, "signature": signature_dict(signature), "backend": backend,
                         "times_ms": dict((entry or {}).get("times_ms", {})),
                         "probe_ms": dict((entry or {}).get("probe_ms", {})),
                         "skipped": dict((entry or {}).get("skipped", {}))}


# ----------------------------------------------------------------------------- choosing


@torch.compiler.assume_constant_result
def _compiled_choice(op: str, signature: Signature, device_type: str, index: int) -> str:
    # A constant for torch.compile: the cached choice, else the static order; never measures.
    return _CACHE.get(op, signature, _device_key(device_type, index)) or static_choice(device_type)


def pick_backend(requested: str, device: Union[torch.device, str], op: str, signature: Signature,
                 make_runner: MakeRunner, *, timer: Optional[Callable[[], float]] = None) -> str:
    """The concrete backend a call runs on.

    ``requested != "auto"``, ``RESFAST_BACKEND`` set or ``RESFAST_AUTOTUNE=0``: exactly
    :func:`resfast.backends.resolve_backend` (nothing measured). ``"auto"``: the cached
    choice for ``(op, signature)`` on this device and these versions, else the winner of
    :func:`measure` over :func:`candidate_backends`, remembered in memory and in the cache
    file. Where measuring is not allowed (``torch.compile`` tracing, CUDA graph capture, see
    the module docstring) an uncached signature gets the static order, and is not remembered.

    Args:
        requested: ``"auto" | "eager" | "triton" | "native"``.
        device: the call's device.
        op: the op's name (a cache-key part).
        signature: the call signature (hashable, JSON-friendly ``(name, value)`` pairs).
        make_runner: ``make_runner(backend, small)`` (see :data:`MakeRunner`).
        timer: the clock for :func:`measure` (tests inject a fake one).
    """
    if requested != "auto" or not autotune_enabled():
        return resolve_backend(requested, device)
    device = torch.device(device)
    index = -1 if device.index is None else device.index
    if torch.compiler.is_compiling():
        return _compiled_choice(op, signature, device.type, index)
    dkey = _device_key(device.type, index)
    hit = _CACHE.get(op, signature, dkey)
    if hit is not None:
        if _RECORDERS:
            _record(op, signature, hit, _CACHE.entry(op, signature, dkey))
        return hit
    candidates = candidate_backends(device)
    if len(candidates) == 1:  # the CPU: eager, nothing to measure
        if _RECORDERS:
            _record(op, signature, candidates[0], None)
        return candidates[0]
    if not candidates or not _may_measure(device):
        return static_choice(device)
    with _CACHE.lock, _measuring(device):
        m = measure(candidates, make_runner, device=device, timer=timer)
    if not m.times_ms and not m.probe_ms:
        # Nothing could run (out of memory, arguments the op will reject): the call itself runs,
        # or raises, on the static order, and this process does not measure the signature again.
        choice = static_choice(device)
        _CACHE.remember(op, signature, dkey, choice)
        return choice
    entry = {"op": op, "signature": signature_dict(signature), "backend": m.backend,
             "times_ms": {k: round(v, 6) for k, v in m.times_ms.items()}, "skipped": m.skipped,
             "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if m.probe_ms:
        entry["probe_ms"] = {k: round(v, 6) for k, v in m.probe_ms.items()}
    _CACHE.put(op, signature, dkey, entry)
    if _RECORDERS:
        _record(op, signature, m.backend, entry)
    return m.backend


# ----------------------------------------------------------------------------- helpers of the call sites
# The call sites themselves (the signature and the runner of each op) live beside their ops:
# resfast.ops.bn_relu_conv2d.bn_relu_conv2d_backend, resfast.ops.dense_block.dense_block_backend.


def training_runner(call: Callable[[], Tensor], leaves: Sequence[Tensor], grad: bool) -> Runner:
    """A :data:`Runner` for one call of an op as training runs it: ``call()`` under
    ``torch.set_grad_enabled(grad)``, then, when ``leaves`` need gradients, their gradients by
    ``torch.autograd.grad`` with one fixed random output gradient (drawn on the first run)."""
    gy: List[Tensor] = []

    def run() -> None:
        with torch.set_grad_enabled(grad):
            y = call()
            if leaves:
                if not gy:
                    gy.append(torch.randn_like(y))
                torch.autograd.grad(y, list(leaves), gy[0])

    return run


def strides_class(t: Tensor) -> str:
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strided"


def static_dims(*values) -> bool:
    """All ints known while torch.compile traces (a dynamic dimension: no lookup)."""
    return all(has_static_value(v) for v in values)


def scratch(t: Tensor, size: Optional[Sequence[int]] = None, *, like_strides: bool = True) -> Tensor:
    """Random tensor of ``t``'s dtype, device and strides class, of ``t``'s shape or ``size``."""
    size = tuple(t.shape) if size is None else tuple(size)
    if like_strides and all(s > 0 or n <= 1 for s, n in zip(t.stride(), t.shape)):
        cls = strides_class(t)
        if cls == "strided":
            s = torch.empty_strided(size, t.stride(), dtype=t.dtype, device=t.device)
        else:
            fmt = torch.channels_last if cls == "channels_last" else torch.contiguous_format
            s = torch.empty(size, dtype=t.dtype, device=t.device, memory_format=fmt)
    else:
        s = torch.empty(size, dtype=t.dtype, device=t.device)
    return s.normal_() if s.is_floating_point() else s.zero_()


#: The probe's small call has at most this many output rows and columns ...
PROBE_POSITIONS = 2
#: ... and at most this many channels (per group, and in all).
PROBE_CHANNELS = 32


def conv_out(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def probe_extent(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """An input extent (at most ``size``) whose conv output has at most PROBE_POSITIONS rows."""
    need = (PROBE_POSITIONS - 1) * stride + dil * (k - 1) + 1 - 2 * pad
    return max(1, min(size, need))


def probe_batch(n: int, positions: int, training: bool) -> int:
    """1, or 2 where batch statistics of one value per channel would be refused."""
    return min(n, 2) if training and positions == 1 else 1


def scratch_param(t: Optional[Tensor], shape: Sequence[int], grad: bool) -> Optional[Tensor]:
    """A scratch parameter like ``t`` (dtype, device) of ``shape``, random, a leaf that requires
    grad when ``grad`` and ``t`` does; ``None`` for ``None``."""
    if t is None:
        return None
    s = t.new_empty(tuple(shape)).normal_().mul_(0.1)
    return s.requires_grad_(grad and t.requires_grad and t.is_floating_point())


def as_pair(v) -> Tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v), int(v))


def autocast_dtype(x: Tensor) -> str:
    dt = x.device.type
    try:
        enabled = torch.is_autocast_enabled(dt)
        dtype = torch.get_autocast_dtype(dt) if enabled else None
    except (TypeError, AttributeError, RuntimeError):
        dtype = None
    return str(dtype).replace("torch.", "") if dtype is not None and x.is_floating_point() else "off"
