"""Evaluate a traced function in stages over a stream of chunks, carrying state between stages.

`jaxadapt.methods.bn.stats.plate_stats` needs the outputs of a function in rounds: round k's
outputs (BN group k's sufficient statistics, summed over every chunk of a plate) are
inputs of round k+1 (its normalization statistics). Re-running the whole function from
the images each round costs one full pass per round. Instead the function's jaxpr is cut
into stages, each evaluated once per chunk:

- an input is *ready* at a stage (e.g. group g's statistics at stage g + 1) and is either
  per-chunk (images, mask) or fixed across chunks (parameters, statistics);
- an equation is ready when all its inputs are; a per-chunk equation runs exactly once,
  in the stage where it becomes ready (so all stages together compute one forward pass);
  equations on fixed inputs only (per-channel vectors such as ``rsqrt(var + eps)``) are
  never carried: each stage that reads them recomputes them (negligible);
- each stage's outputs are reduced over the chunks inside its compiled step ("sum",
  or "same" for values that do not depend on the chunk);
- the carried state after stage k is the per-chunk values computed so far that later
  stages read; it waits between stages in a `CarryStore`: on the device where it fits
  (on a GPU, host copies of every activation would cost more than the compute), else
  in host RAM or in .npy files on disk, so that device memory stays bounded by one
  chunk.

Evaluation goes through public `jax.extend.core` (``Jaxpr``, ``ClosedJaxpr``,
``jaxpr_as_fun``), which binds each equation as `jax.core.eval_jaxpr` does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage, run once per chunk:
    ``step(acc, *fixed_inputs, *carry_in, *chunk_inputs) -> (acc, carry_out)``, where
    ``acc`` holds this stage's outputs reduced over the chunks so far (start: zeros)."""

    step: Callable
    fixed_in: tuple[int, ...]  # positions of the fixed top-level inputs step reads
    chunk_in: tuple[int, ...]  # which per-chunk inputs step reads (stage 0 only)
    carry_in: tuple[int, ...]  # ids of carried values step reads
    carry_out: tuple[int, ...]  # ids of carried values step produces
    outs: tuple[int, ...]  # positions of the top-level outputs step produces
    free: tuple[int, ...]  # carried ids that no later stage reads
    zeros: tuple[Any, ...]  # ShapeDtypeStruct of each output: the initial acc


@dataclasses.dataclass(frozen=True)
class Plan:
    """Stages of a jaxpr, and the host bytes its carried state needs per chunk."""

    stages: tuple[Stage, ...]
    carry_nbytes: tuple[int, ...]  # bytes per chunk of each carried value (by id)
    peak_nbytes: int  # most bytes per chunk held at once (freed chunk by chunk)
    chunk_prims: tuple[tuple[str, ...], ...]  # per-chunk primitives each stage evaluates


def _is_var(v: Any) -> bool:
    return not isinstance(v, jex.Literal) and not isinstance(v, jex.DropVar)


def _nbytes(v: Any) -> int:
    return int(np.prod(v.aval.shape, dtype=np.int64)) * np.dtype(v.aval.dtype).itemsize


def _reads(eqns: list) -> set:
    return {v for e in eqns for v in e.invars if _is_var(v)}


def _debug_info(n_in: int, n_out: int) -> Any:
    try:
        return jex.DebugInfo("plate stage", None, tuple(f"a{i}" for i in range(n_in)),
                             tuple(f"r{i}" for i in range(n_out)))
    except TypeError:  # the fields changed: Jaxpr accepts a missing debug_info
        return None


def _step_fn(eqns: list, consts: dict, invars: list, outvars: list, reduce: tuple,
             cache: dict) -> Callable:
    """A jitted ``step(acc, *invars)``: evaluates ``eqns``, folds the first
    ``len(reduce)`` outputs into ``acc`` ("sum": add; "same": replace), returns the
    rest. Stages with the same program (repeated blocks) share one compiled function."""
    used = _reads(eqns) | {v for v in outvars if _is_var(v)}
    constvars = [v for v in consts if v in used and v not in set(invars)]
    effects = frozenset().union(*(e.effects for e in eqns))
    jaxpr = jex.Jaxpr(constvars, invars, outvars, eqns, effects,
                      _debug_info(len(invars), len(outvars)))
    # The printed program (shapes, parameters, literals) identifies it unless it closes
    # over constants, whose values are not printed.
    key = None if constvars else (str(jaxpr), reduce)
    if key is not None and key in cache:
        return cache[key]
    fun = jex.jaxpr_as_fun(jex.ClosedJaxpr(jaxpr, [consts[v] for v in constvars]))

    def step(acc, *args):
        res = fun(*args)
        new = [a + r if how == "sum" else r for a, r, how in zip(acc, res, reduce)]
        return new, list(res[len(reduce):])

    fn = jax.jit(step)
    if key is not None:
        cache[key] = fn
    return fn


def _sub_jaxpr(eqn) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, jex.ClosedJaxpr):
            return sub.jaxpr
        if isinstance(sub, jex.Jaxpr):
            return sub
    return None


def propagate(jaxpr, in_deps: Sequence[frozenset]) -> list[frozenset]:
    """Which inputs each output of ``jaxpr`` depends on (exact through nested calls,
    conservative -- union of all inputs -- through any other primitive).

    Args:
      jaxpr: a `Jaxpr`.
      in_deps: per input, a set of labels (e.g. which BN layers' statistics it holds).

    Returns:
      Per output, the union of the labels of the inputs it depends on.
    """
    env: dict[Any, frozenset] = dict(zip(jaxpr.invars, in_deps))

    def read(v):
        return frozenset() if isinstance(v, jex.Literal) else env.get(v, frozenset())

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
            outs = propagate(sub, ins)
        else:
            outs = [frozenset().union(*ins)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _live_eqns(jaxpr: Any) -> list:
    """The equations that some output depends on, in order (dead code dropped, and with
    it side effects such as debug prints that no output needs)."""
    live = {v for v in jaxpr.outvars if _is_var(v)}
    keep = []
    for e in reversed(jaxpr.eqns):
        if any(o in live for o in e.outvars):
            keep.append(e)
            live.update(v for v in e.invars if _is_var(v))
    return keep[::-1]


def _closure(eqns: list, wanted: set) -> list:
    """The subset of ``eqns`` (in order) that ``wanted`` values depend on."""
    need, keep = set(wanted), []
    for e in reversed(eqns):
        if any(o in need for o in e.outvars):
            keep.append(e)
            need.update(v for v in e.invars if _is_var(v))
    return keep[::-1]


def _analyse(jaxpr: Any, ready, per_chunk, out_stage, out_reduce) -> tuple:
    """Live equations, the stage each value is ready at, and the per-chunk values."""
    at: dict[Any, int] = dict(zip(jaxpr.invars, ready))
    at.update((v, 0) for v in jaxpr.constvars)
    chunked = {v for v, c in zip(jaxpr.invars, per_chunk) if c}
    eqns = _live_eqns(jaxpr)
    for e in eqns:
        r = max((at[v] for v in e.invars if _is_var(v)), default=0)
        at.update((o, r) for o in e.outvars)
        if any(_is_var(v) and v in chunked for v in e.invars):
            chunked.update(e.outvars)
    for j, v in enumerate(jaxpr.outvars):
        if out_reduce[j] not in ("sum", "same"):
            raise ValueError(f"out_reduce[{j}]={out_reduce[j]!r}; use 'sum' or 'same'")
        if _is_var(v) and at[v] > out_stage[j]:
            raise ValueError(
                f"output {j} is needed at stage {out_stage[j]} but depends on inputs "
                f"ready at stage {at[v]}: this function cannot be staged")
        if out_reduce[j] == "same" and _is_var(v) and v in chunked:
            raise ValueError(f"output {j} changes from chunk to chunk: reduce it with 'sum'")
    return eqns, at, chunked


def plan(closed: Any, ready: Sequence[int], per_chunk: Sequence[bool],
         out_stage: Sequence[int], out_reduce: Sequence[str]) -> Plan:
    """Cut a closed jaxpr into stages (see the module docstring).

    Args:
      closed: the `ClosedJaxpr` of the function.
      ready: per input, the first stage at which it is known (per-chunk inputs: 0).
      per_chunk: per input, whether it changes from chunk to chunk.
      out_stage: per output, the stage that must produce it.
      out_reduce: per output, how chunks combine: "sum", or "same" (a value that does
        not depend on the chunk).

    Returns:
      The `Plan`.

    Raises:
      ValueError: an output needs an input that is ready only at a later stage, or a
        "same" output depends on the chunk.
    """
    jaxpr = closed.jaxpr
    eqns, at, chunked = _analyse(jaxpr, ready, per_chunk, out_stage, out_reduce)
    order = {v: i for i, v in enumerate(
        [*jaxpr.constvars, *jaxpr.invars, *(o for e in jaxpr.eqns for o in e.outvars)])}
    n = 1 + max(out_stage, default=-1)
    work = [[e for e in eqns if e.outvars[0] in chunked and at[e.outvars[0]] == k]
            for k in range(n)]
    produced_in = {v: 0 for v in jaxpr.invars if v in chunked}
    produced_in.update((o, k) for k in range(n) for e in work[k] for o in e.outvars)
    outs = [[j for j, s in enumerate(out_stage) if s == k] for k in range(n)]
    reads = []
    for k in range(n):
        r = _reads(work[k]) | {v for j in outs[k] if _is_var(v := jaxpr.outvars[j])}
        reads.append(r - {o for e in work[k] for o in e.outvars})
    carried = sorted({v for k in range(n) for v in reads[k]
                      if v in chunked and produced_in[v] < k}, key=order.get)
    cid = {v: i for i, v in enumerate(carried)}
    last = {v: max(k for k in range(n) if v in reads[k]) for v in carried}
    consts = dict(zip(jaxpr.constvars, closed.consts))
    fixed_eqns = [e for e in eqns if e.outvars[0] not in chunked]
    chunk_order = [v for v in jaxpr.invars if v in chunked]
    stages, cache = [], {}
    for k in range(n):
        chunk_inputs = [v for v in chunk_order if v in reads[0] or v in cid] if k == 0 else []
        carry_in = [v for v in carried if v in reads[k] and produced_in[v] < k]
        carry_out = [v for v in carried if produced_in[v] == k]
        prep = _closure(fixed_eqns, {v for v in reads[k] if v not in chunked})
        used = _reads(prep) | reads[k]
        fixed_in = [v for v in jaxpr.invars if v not in chunked and v in used]
        step_out = [jaxpr.outvars[j] for j in outs[k]] + carry_out
        run_eqns = sorted(prep + work[k], key=lambda e: order[e.outvars[0]])
        reduce = tuple(out_reduce[j] for j in outs[k])
        stages.append(Stage(
            step=_step_fn(run_eqns, consts, fixed_in + carry_in + chunk_inputs, step_out,
                          reduce, cache),
            fixed_in=tuple(jaxpr.invars.index(v) for v in fixed_in),
            chunk_in=tuple(chunk_order.index(v) for v in chunk_inputs),
            carry_in=tuple(cid[v] for v in carry_in),
            carry_out=tuple(cid[v] for v in carry_out),
            outs=tuple(outs[k]),
            free=tuple(cid[v] for v in carried if last[v] == k),
            zeros=tuple(jax.ShapeDtypeStruct(jaxpr.outvars[j].aval.shape,
                                             jaxpr.outvars[j].aval.dtype) for j in outs[k])))
    nbytes = tuple(_nbytes(v) for v in carried)
    prims = tuple(tuple(e.primitive.name for e in es) for es in work)
    return Plan(tuple(stages), nbytes, _peak(stages, nbytes), prims)


def _peak(stages: Sequence[Stage], nbytes: Sequence[int]) -> int:
    """Most carried bytes per chunk held at once, when a value is freed chunk by chunk
    as soon as its last stage has read it."""
    held, peak = set(), 0
    for s in stages:
        dying = {i for i in s.free if i in held}
        keep = sum(nbytes[i] for i in held - dying)
        new = sum(nbytes[i] for i in s.carry_out if i not in s.free)
        peak = max(peak, keep + max(new, sum(nbytes[i] for i in dying)))
        held = (held - dying) | (set(s.carry_out) - set(s.free))
    return peak


def _host_free() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return 0.0  # unknown: keep the path that needs no memory


def free_bytes(kind: str, spill_dir: str | None) -> float:
    """Free bytes where a `CarryStore` of this kind would live.

    Args:
      kind: "device" (a CPU device's memory is host RAM), "host" or "disk".
      spill_dir: the folder for "disk" (default: the system's temporary folder).

    Returns:
      Bytes free now (0 when unknown, so that callers take the path needing none).
    """
    if kind == "disk":
        return float(shutil.disk_usage(spill_dir or tempfile.gettempdir()).free)
    if kind == "device" and jax.default_backend() != "cpu":
        stats = jax.local_devices()[0].memory_stats() or {}
        return float(stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0))
    return _host_free()


#: Where a `CarryStore` keeps the carried values.
KINDS: tuple[str, ...] = ("device", "host", "disk")


class CarryStore:
    """Carried values of every chunk: on the device (no copies; host memory on a CPU
    backend), in host RAM (NumPy), or as .npy files in a temporary folder under
    ``spill_dir`` (read back memory-mapped). Counts its bytes."""

    def __init__(self, kind: str = "host", spill_dir: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"CarryStore kind={kind!r}; use one of {KINDS}")
        self.kind = kind
        self._ram: dict[tuple[int, int], Any] = {}
        self._sizes: dict[tuple[int, int], int] = {}
        self._dir = None if kind != "disk" else tempfile.mkdtemp(
            prefix="plate_carry_", dir=spill_dir)
        self.nbytes = self.peak = 0

    def _file(self, key: tuple[int, int]) -> str:
        return os.path.join(self._dir, f"{key[0]}_{key[1]}.npy")

    def put(self, cid: int, chunk: int, value: Any) -> None:
        """Keep one chunk's value (copied to the host unless kind is "device")."""
        arr = value if self.kind == "device" else np.asarray(value)
        if self._dir is None:
            self._ram[(cid, chunk)] = arr
        else:
            np.save(self._file((cid, chunk)), arr)
        self._sizes[(cid, chunk)] = arr.nbytes
        self.nbytes += arr.nbytes
        self.peak = max(self.peak, self.nbytes)

    def get(self, cid: int, chunk: int) -> np.ndarray:
        """One chunk's value."""
        if self._dir is None:
            return self._ram[(cid, chunk)]
        return np.load(self._file((cid, chunk)), mmap_mode="r")

    def free(self, cid: int, chunk: int) -> None:
        """Drop one chunk's value (no later stage reads it)."""
        self.nbytes -= self._sizes.pop((cid, chunk))
        if self._dir is None:
            del self._ram[(cid, chunk)]
        else:
            os.remove(self._file((cid, chunk)))

    def close(self) -> None:
        """Drop everything (and the spill folder)."""
        self._ram.clear()
        self._sizes.clear()
        self.nbytes = 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def run(plan: Plan, inputs: list, chunks: Iterable[Sequence], store: CarryStore,
        finish: Callable[[int, dict[int, Any]], dict[int, Any]],
        budget: float = float("inf")) -> bool:
    """Evaluate a `Plan` over a stream of chunks, stage by stage.

    Args:
      plan: from `plan`.
      inputs: values of the fixed inputs by position (per-chunk positions: anything);
        updated in place with what ``finish`` returns.
      chunks: per-chunk input tuples (in input order); iterated once, in stage 0.
      store: where carried values wait between stages.
      finish: ``finish(k, outputs)`` after stage k, with ``{output position: value
        reduced over all chunks}``: returns ``{input position: value}`` of the inputs
        that become ready (e.g. the statistics of group k).
      budget: host bytes the carried state may reach; checked while stage 0 reads the
        chunks (``peak_nbytes`` per chunk).

    Returns:
      False if the budget would be exceeded (then nothing was finished), else True.
    """
    n_chunks = 0
    for k, st in enumerate(plan.stages):
        fixed = [inputs[i] for i in st.fixed_in]
        acc = [jnp.zeros(z.shape, z.dtype) for z in st.zeros]
        pending = None
        for i, item in enumerate(chunks if k == 0 else range(n_chunks)):
            if k == 0:
                n_chunks = i + 1
                if n_chunks * plan.peak_nbytes > budget:
                    return False
            acc, carry = st.step(acc, *fixed, *[store.get(c, i) for c in st.carry_in],
                                 *([item[j] for j in st.chunk_in] if k == 0 else ()))
            for c in st.free:
                store.free(c, i)
            for a in carry if store.kind != "device" else ():
                a.copy_to_host_async()  # overlaps the copy with the next chunk's compute
            if pending is not None:
                _put(store, st.carry_out, *pending)
            pending = (i, carry)
        if pending is not None:
            _put(store, st.carry_out, *pending)
        for pos, value in finish(k, dict(zip(st.outs, acc))).items():
            inputs[pos] = value
    return True


def _put(store: CarryStore, ids: Sequence[int], chunk: int, values: Sequence) -> None:
    for c, v in zip(ids, values):
        store.put(c, chunk, v)
