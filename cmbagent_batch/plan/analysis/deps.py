"""Dependency analysis: explicit, file-inferred and LLM-inferred edges, with the LLM part cached.

The LLM is asked once per content: the cache key hashes what is sent (task facts, the edges already
known, the model, the prompt and analysis versions). When some tasks changed since the last analysis
of the same spec, the LLM edges among unchanged tasks are kept and the model is asked only about
edges touching the changed ones. A failed analysis follows ``analysis.fallback`` and says so.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cmbagent_batch.errors import AnalysisError, BatchError, CycleError, LlmAnalysisError, UsageError
from cmbagent_batch.plan.analysis.cache import Cache, digest
from cmbagent_batch.plan.analysis.files import file_edges
from cmbagent_batch.plan.dag import EDGE_SOURCES, Dag, Edge
from cmbagent_batch.spec.model import JobSpec, ModelSpec, TaskSpec
from cmbagent_batch.spec.pricing import call_cost
from cmbagent_batch.spec.tasks import Tasks, task_ids

if TYPE_CHECKING:  # the module itself is imported only when an analysis asks the model
    from cmbagent_batch.plan.analysis.llm import LlmCall

ANALYSIS_VERSION = "1"


@dataclass
class Analysis:
    """The edges of a job and how they were found (``info`` is the plan's ``analysis`` section)."""

    edges: list[Edge]
    info: dict[str, Any] = field(default_factory=dict)


def explicit_edges(tasks: Sequence[TaskSpec]) -> list[Edge]:
    if isinstance(tasks, Tasks):  # only the tasks that depend on some are looked at
        pairs: Iterable[tuple[str, tuple[str, ...]]] = ((tasks.id_at(pos), ds) for pos, ds in tasks.dependencies())
    else:
        pairs = ((t.id, t.depends_on) for t in tasks)
    return [Edge(dep, tid, "order", "explicit", f"{tid!r} lists {dep!r} in depends_on") for tid, ds in pairs for dep in ds]


def cycle_error(exc: CycleError, edges: list[Edge]) -> UsageError:
    """A cycle in the edges, spelled out with the reason of each edge on it."""
    by_pair: dict[tuple[str, str], Edge] = {}
    for e in edges:  # the most authoritative edge of a pair, as the Dag keeps it
        old = by_pair.get((e.src, e.dst))
        if old is None or EDGE_SOURCES.index(e.source) < EDGE_SOURCES.index(old.source):
            by_pair[(e.src, e.dst)] = e
    steps = []
    for a, b in zip(exc.cycle, exc.cycle[1:]):
        on_cycle = by_pair.get((a, b))
        steps.append(f"  {a} -> {b}: {on_cycle.reason} [{on_cycle.source}]" if on_cycle else f"  {a} -> {b}")
    return UsageError("the dependency edges make a cycle (-> reads 'runs before'):\n" + "\n".join(steps))


def analyse(spec: JobSpec, cache: Cache | None, *, refresh: bool, warn: Callable[[str], None],
            offline: bool = False, record_calls: Callable[[Sequence[LlmCall]], None] | None = None,
            budget_spent: Callable[[], str | None] | None = None, server_logs: str | None = None) -> Analysis:
    """The job's edges. ``offline``: use cached LLM answers only (AnalysisError when there are none).
    ``record_calls`` gets each model call (an ``LlmCall``, failed ones too) as it ends, for the cost ledger;
    ``budget_spent`` says why no model call may start (the job's budget is spent), or None.
    ``server_logs``: the directory for the log of a local model's server, if one starts (None: the cache's)."""
    sources = spec.analysis.sources
    edges: list[Edge] = []
    if "explicit" in sources:
        edges += explicit_edges(spec.tasks)
    if "files" in sources:
        edges += file_edges(spec.tasks)
    info: dict[str, Any] = {
        "sources": list(sources),
        "model": None,
        "cache": "off",
        "requests": 0,
        "fallback_used": None,
    }
    if "llm" not in sources:
        return Analysis(edges, info)
    try:  # a cycle among the other sources' edges is reported before any request is paid for
        Dag(task_ids(spec.tasks), edges)
    except CycleError as exc:
        raise cycle_error(exc, edges) from None
    model_key = spec.analysis.model or spec.llm.default_model
    assert model_key is not None  # the loader and config refuse llm analysis without a model
    info["model"] = model_key
    try:
        llm_edges = _llm_edges(spec, edges, cache, refresh, info, offline, record_calls, budget_spent, server_logs)
    except AnalysisError as exc:
        if offline:
            raise
        return _fallback(spec, edges, info, exc, warn)
    return Analysis(edges + llm_edges, info)


def _context(spec: JobSpec, cache: Cache | None) -> dict[str, Any]:
    """What the model's answers depend on besides the tasks. A local model is known by its file's sha256,
    not by its server's URL, whose port changes from run to run."""
    from cmbagent_batch.plan.analysis.llm_reply import PROMPT_VERSION

    model = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
    context = {"model": model.model, "base_url": model.base_url, "prompt": PROMPT_VERSION, "analysis": ANALYSIS_VERSION}
    if model.provider == "local":
        from cmbagent_batch.llm.local_model import LocalModel, model_file

        try:
            context["model_sha256"] = _file_sha256(model_file(LocalModel.from_spec(model, spec.path)), cache)
        except (BatchError, OSError) as exc:
            what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise AnalysisError(f"LLM dependency analysis with local model '{model.name}': {what}") from None
    return context


def _file_sha256(path: str, cache: Cache | None) -> str:
    """sha256 of a (large) file, remembered in the cache by path, size and modification time."""
    st = os.stat(path)
    key = digest({"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    record = cache.get("file-sha256", key) if cache is not None else None
    if record is None:
        sha = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                sha.update(block)
        record = {"sha256": sha.hexdigest()}
        if cache is not None:
            cache.put("file-sha256", key, record)
    return str(record["sha256"])


def _llm_edges(spec: JobSpec, known: list[Edge], cache: Cache | None, refresh: bool, info: dict[str, Any],
               offline: bool = False, record_calls: Callable[[Sequence[LlmCall]], None] | None = None,
               budget_spent: Callable[[], str | None] | None = None, server_logs: str | None = None) -> list[Edge]:
    from cmbagent_batch.plan.analysis.llm_reply import task_facts

    context = _context(spec, cache)
    facts = {t.id: task_facts(t) for t in spec.tasks}
    fields = {tid: {k: digest(v) for k, v in f.items()} for tid, f in facts.items()}
    hashes = {tid: digest(f) for tid, f in facts.items()}
    known_pairs = sorted({(e.src, e.dst) for e in known})
    full_key = digest({"context": context, "tasks": hashes, "known": known_pairs})
    lineage_key = digest({"spec": os.path.abspath(spec.path), "job": spec.job.name, "context": context})
    info["cache"] = "miss"
    if refresh:
        info["cache_reason"] = "--refresh-analysis"
    elif cache is not None:
        record = cache.get("llm", full_key)
        if record is not None:
            info.update(cache="hit", cache_reason="same tasks, known edges, model and prompt as a cached analysis")
            return [Edge(**e) for e in record["edges"]]
    previous = None if (refresh or cache is None) else cache.get("llm-last", lineage_key)
    reused, ask_about = _reusable(previous, hashes, fields, known, known_pairs, info)
    if previous is None and not refresh:
        info["cache_reason"] = "no earlier analysis of this spec with this model and prompt version"
    new_edges: list[Edge] = []
    calls: list[LlmCall] = []
    if (ask_about is None or ask_about) and offline:
        raise AnalysisError("the LLM dependency analysis of this spec is not cached; run 'cmbagent-batch plan SPEC' first")
    if ask_about is None or ask_about:
        from cmbagent_batch.plan.analysis.llm import infer_edges

        if budget_spent is not None and (why := budget_spent()) is not None:
            raise AnalysisError(f"LLM dependency analysis not started: {why}")

        model = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
        pairs = known_pairs + [(e.src, e.dst) for e in reused]
        try:
            on_call = None if record_calls is None else (lambda call: record_calls([call]))
            result = infer_edges(spec.tasks, pairs, model, ask_about=ask_about, on_call=on_call,
                                 base_url=_local_url(spec, model, cache, server_logs))
        except LlmAnalysisError as exc:
            _record_calls(info, exc.calls, spec)
            raise
        new_edges, calls = list(result.edges), list(result.calls)
        info["mode"] = result.mode
        if result.notes:
            info["notes"] = list(result.notes)
    _record_calls(info, calls, spec)
    edges = sorted(reused + new_edges, key=lambda e: (e.src, e.dst))
    if cache is not None:
        record = {
            "tasks": hashes,
            "fields": fields,
            "known": known_pairs,
            "edges": [asdict(e) for e in edges],
        }
        cache.put("llm", full_key, record)
        cache.put("llm-last", lineage_key, record)
    return edges


def _local_url(spec: JobSpec, model: ModelSpec, cache: Cache | None,
               server_logs: str | None) -> Callable[[], str] | None:
    """For a local model, what starts its server (in this process) and gives its URL; else None."""
    if model.provider != "local":
        return None
    from cmbagent_batch.llm.local_model import LocalModel, endpoint

    logs = server_logs or os.path.join(cache.root if cache is not None else tempfile.gettempdir(), "local-model")
    return lambda: endpoint(LocalModel.from_spec(model, spec.path), logs)


def _reusable(
    previous: dict[str, Any] | None,
    hashes: dict[str, str],
    fields: dict[str, dict[str, str]],
    known: list[Edge],
    known_pairs: list[tuple[str, str]],
    info: dict[str, Any],
) -> tuple[list[Edge], set[str] | None]:
    """LLM edges still valid from the last analysis, and the tasks to ask about (None: all)."""
    if previous is None:
        return [], None
    old_hashes: dict[str, str] = previous["tasks"]
    changed = sorted(tid for tid, h in hashes.items() if old_hashes.get(tid) != h)
    removed = sorted(tid for tid in old_hashes if tid not in hashes)
    why = []
    for tid in changed:
        old_fields = previous["fields"].get(tid)
        if old_fields is None:
            why.append(f"{tid} (new)")
        else:
            diff = sorted(k for k in set(old_fields) | set(fields[tid]) if old_fields.get(k) != fields[tid].get(k))
            why.append(f"{tid} ({', '.join(diff)} changed)")
    why += [f"{tid} (removed)" for tid in removed]
    # A pair the model was told is known but no longer is: ask about its tasks again.
    now_known = set(known_pairs)
    for a, b in sorted({(a, b) for a, b in previous["known"]} - now_known):
        if a not in hashes or b not in hashes:
            continue  # the pair went with a removed task
        for tid in (a, b):
            if tid in hashes and tid not in changed:
                changed.append(tid)
                why.append(f"{tid} (known dependencies changed)")
    changed.sort()
    stale = set(changed) | set(removed)
    reused = [Edge(**e) for e in previous["edges"] if e["src"] not in stale and e["dst"] not in stale]
    try:
        Dag(hashes, known + reused)
    except (CycleError, ValueError):
        info["cache_reason"] = "edges from other sources changed so that earlier LLM edges no longer fit"
        return [], None
    info["changed"] = why
    info["reused_edges"] = len(reused)
    if why:
        info["cache_reason"] = f"{len(why)} task(s) changed since the last analysis: " + "; ".join(why[:20]) + (
            f"; and {len(why) - 20} more" if len(why) > 20 else ""
        )
    else:
        info["cache_reason"] = "rebuilt from the last analysis of this spec; no task changed"
    info["cache"] = "partial"
    return reused, set(changed)


def _record_calls(info: dict[str, Any], calls: Sequence[LlmCall], spec: JobSpec) -> None:
    model = spec.llm.models[spec.analysis.model or spec.llm.default_model or ""]
    price = model.price
    assert price is not None  # the loader refuses unpriced models
    rows = []
    for c in calls:
        row = asdict(c)
        row["cost_usd"] = call_cost(price, c.prompt_tokens, c.cached_prompt_tokens, c.completion_tokens)
        rows.append(row)
    info["requests"] = len(rows)
    info["calls"] = rows
    info["prompt_tokens"] = sum(r["prompt_tokens"] for r in rows)
    info["completion_tokens"] = sum(r["completion_tokens"] for r in rows)
    info["cost_usd"] = sum(r["cost_usd"] for r in rows)


def _fallback(spec: JobSpec, edges: list[Edge], info: dict[str, Any], exc: AnalysisError, warn: Callable[[str], None]) -> Analysis:
    mode = spec.analysis.fallback
    if mode == "error":
        raise AnalysisError(
            f"{exc}\n(analysis.fallback is 'error'; set it to 'explicit' or 'sequential' to plan without LLM edges)"
        ) from None
    info["fallback_used"] = mode
    info["fallback_reason"] = str(exc)
    if mode == "explicit":
        warn(f"LLM dependency analysis failed; using only the other sources' edges (analysis.fallback: explicit): {exc}")
        return Analysis(edges, info)
    warn(f"LLM dependency analysis failed; running tasks one after another (analysis.fallback: sequential): {exc}")
    order = _file_order_topological(spec, edges)
    chain = [
        Edge(a, b, "order", "fallback", "analysis.fallback is 'sequential' and LLM analysis failed")
        for a, b in zip(order, order[1:])
    ]
    return Analysis(edges + chain, info)


def _file_order_topological(spec: JobSpec, edges: list[Edge]) -> list[str]:
    """Tasks in file order, moved only as far as the known edges require (a stable topological sort)."""
    import heapq

    position = {t.id: i for i, t in enumerate(spec.tasks)}
    waiting = {t.id: 0 for t in spec.tasks}
    after: dict[str, list[str]] = {}
    for e in {(e.src, e.dst) for e in edges}:
        waiting[e[1]] += 1
        after.setdefault(e[0], []).append(e[1])
    ready = [(position[t], t) for t, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, tid = heapq.heappop(ready)
        order.append(tid)
        for nxt in after.get(tid, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (position[nxt], nxt))
    return order
