"""Who blocks whom: PostgreSQL's lock-wait graph, each backend mapped to the code holding it.

Why: postgres_exporter counts blocked backends and pgwatch lists one-hop pid pairs, but
the question on call is "which code holds the lock everybody queues behind, and what is it
doing". The sidecar has both halves: `pg_blocking_pids()` of every backend waiting on a
lock (the poll, `postgres.py`) and every live hold with its backend pid, code site, thread
and trace (the workers' documents). This module joins them into a forest:

- an edge waiter → blocker for each pid in a backend's `blocked_by`. PostgreSQL lists hard
  blocks (the blocker holds the lock) and soft ones (it waits ahead in the queue for a
  conflicting lock): a second `UPDATE` of one row queues behind the first waiter, which
  holds the row's tuple lock, so it shows one level down, under that waiter;
- a backend is attributed to a hold only when `api.join` accepts the row for that hold
  (sampled after the hold began, its transaction and state not older): a row from another
  moment is never pinned on whoever holds the connection now. Otherwise, and for sessions
  no instrumented pool holds (psql, a migration, a cron job), the node is `unknown`, with
  the server's `application_name` and state;
- roots are backends that block others and wait on nobody. A cycle is a deadlock, which
  PostgreSQL's detector ends after `deadlock_timeout`: it has no root, so it is reported
  apart, and no walk follows an edge twice;
- per root: backends blocked directly, transitively (distinct), the longest chain, and the
  longest lock wait among them.

Everything listed is bounded (depth, children per node, nodes per tree, roots, cycles):
a pile-up of hundreds of sessions is exactly when someone opens this.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from monitor.sidecar import api
from monitor.sidecar.aggregate import View
from monitor.sidecar.postgres import IDLE_IN_TRANSACTION, Backend, PgView

#: Levels listed below a root (its direct waiters are level 1); deeper ones are counted.
MAX_DEPTH = 10
#: Waiters listed under one node; the rest are counted in its `more`.
MAX_CHILDREN = 50
#: Nodes listed in one root's tree, the root included.
MAX_NODES = 200
#: Roots listed by `/api/blocking` (most transitively blocked first); the rest counted.
MAX_ROOTS = 20
#: Deadlock cycles listed.
MAX_CYCLES = 10
#: Root series per metric (`by_site`); the rest add into `code_site="(other)"`.
MAX_SITE_SERIES = 20

#: Label values of roots no hold is attributed to, and of the folded rest.
UNKNOWN = "(unknown)"
OTHER = "(other)"

#: `unknown_reason` of nodes that have no hold to refuse (else `api.join`'s reason).
NO_HOLD = "no hold of an instrumented pool on this backend"
PREPARED = "a prepared transaction (pg_blocking_pids says 0): see pg_prepared_xacts"


@dataclass(frozen=True)
class Node:
    """One backend of the graph: it waits on others, is waited on, or both."""

    pid: int
    #: its pg_stat_activity row; None for a prepared transaction (pid 0) or a backend the
    #: poll does not list (not a client backend, or gone)
    backend: Backend | None
    #: the hold the row describes (`api.join` accepted it), aged to the build's `now`
    hold: dict[str, Any] | None
    #: why no hold is attributed; None when `hold` is set
    unknown: str | None
    blocked_by: tuple[int, ...]
    waiters: tuple[int, ...]


@dataclass(frozen=True)
class Root:
    """A backend that blocks others and waits on nobody. `direct` and `transitive` are
    sets of backends as bit masks (bit i: the forest's i-th pid): a pile-up of thousands
    of sessions behind as many roots stays a few bitwise ORs, not a set per root."""

    pid: int
    direct: int
    transitive: int
    #: edges on the longest chain below it (a direct waiter: 1)
    depth: int
    #: the longest lock wait among `transitive`, as of the poll (0 when none is known)
    lock_wait_max_s: float

    @property
    def blocked_direct(self) -> int:
        return self.direct.bit_count()

    @property
    def blocked_transitive(self) -> int:
        return self.transitive.bit_count()


@dataclass(frozen=True)
class Cycle:
    """Backends waiting on each other (a deadlock), and those stuck behind them (a bit
    mask, as `Root`'s)."""

    pids: tuple[int, ...]
    blocked: int


@dataclass(frozen=True)
class Forest:
    nodes: dict[int, Node]
    #: most transitively blocked first
    roots: tuple[Root, ...]
    cycles: tuple[Cycle, ...]
    #: backends waiting on at least one other
    blocked: int


def _is_pid(value: object) -> bool:
    """A pid as pg_blocking_pids gives them (0: a prepared transaction)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _holds_by_pid(view: View, pids: set[int], now: float) -> dict[int, list[dict[str, Any]]]:
    """The live holds on the graph's backends, aged to `now` as `/api/checkouts` ages them."""
    out: dict[int, list[dict[str, Any]]] = {}
    for hold in view.holds:
        pid = hold.get("backend_pid")
        if _is_pid(pid) and pid in pids:
            out.setdefault(pid, []).append(
                {**hold, "age_s": api.hold_age(hold, view.scanned_at, now)}
            )
    return out


def _attribute(
    pid: int,
    server: Backend | None,
    candidates: Sequence[dict[str, Any]],
    pg: PgView,
    scanned_at: float,
    now: float,
    max_age: float,
) -> tuple[dict[str, Any] | None, str | None]:
    """(the hold the row describes, None) or (None, why none). Among several accepted
    holds on one pid (an ended one its worker still lists) the newest began closest to
    the row's transaction: that one."""
    if pid == 0:
        return None, PREPARED
    accepted: list[tuple[float, dict[str, Any]]] = []
    reason = NO_HOLD
    for hold in candidates:
        started = api.hold_start(hold, scanned_at)
        why = api.join(server, pg, started, now, max_age=max_age)
        if why is None:
            accepted.append((started, hold))
        elif reason == NO_HOLD:
            reason = why
    if accepted:
        return max(accepted, key=lambda a: a[0])[1], None
    return None, reason


def _components(pids: Iterable[int], succ: Mapping[int, Sequence[int]]) -> list[list[int]]:
    """Strongly connected components (Tarjan's, iterative: a pile-up of backends must not
    meet the recursion limit), each listed after every component it reaches."""
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    out: list[list[int]] = []
    for start in sorted(pids):
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        work = [(start, iter(succ.get(start, ())))]
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    out.append(sorted(component))
    return out


def build(
    view: View, pg: PgView, now: float, max_sample_age: float = api.MAX_SAMPLE_AGE_S
) -> Forest:
    """The forest of this poll's lock waits, with holds attributed as `api.join` allows
    (`max_sample_age`: `/api/blocking` wants ≤ 0.5 s, like `/api/checkouts`; `/metrics`
    reads the cached poll, any age, as `/api/checkouts`' `blocked_by` does)."""
    blockers: dict[int, tuple[int, ...]] = {}
    for pid, backend in pg.backends.items():
        found = sorted({p for p in backend.blocked_by if _is_pid(p) and p != pid})
        if found and _is_pid(pid):
            blockers[pid] = tuple(found)
    waiting_on: dict[int, list[int]] = {}
    for pid, found in sorted(blockers.items()):
        for blocker in found:
            waiting_on.setdefault(blocker, []).append(pid)
    waiters = {pid: tuple(w) for pid, w in waiting_on.items()}
    pids = set(blockers) | set(waiters)
    holds = _holds_by_pid(view, pids, now)
    nodes = {}
    for pid in sorted(pids):
        server = pg.backends.get(pid)
        hold, unknown = _attribute(
            pid, server, holds.get(pid, ()), pg, view.scanned_at, now, max_sample_age
        )
        nodes[pid] = Node(pid, server, hold, unknown, blockers.get(pid, ()), waiters.get(pid, ()))

    # One pass over the components, successors first (Tarjan's order): per component,
    # the longest chain below it (edges inside a cycle are not walked again: a cycle adds
    # its length once), the backends it reaches as a bit mask, and their longest lock
    # wait. Linear in edges, plus ORs of masks: a migration's pile-up (N sessions holding
    # a lock, an ALTER waiting on all, N more behind it) costs N² bits, not N² set entries.
    bit = {pid: 1 << i for i, pid in enumerate(sorted(pids))}

    def own_wait(pid: int) -> float:
        backend = nodes[pid].backend
        wait = backend.lock_wait_s if backend is not None else None
        return wait if wait is not None and math.isfinite(wait) else 0.0

    components = _components(pids, waiters)
    component_of = {pid: i for i, members in enumerate(components) for pid in members}
    height: list[int] = []
    reach: list[int] = []  # backends reachable from the component (its own included
    wait_max: list[float] = []  # only when they reach each other: a cycle)
    for i, members in enumerate(components):
        below, mask, wait = 0, 0, 0.0
        for v in members:
            for w in waiters.get(v, ()):
                j = component_of[w]
                if j != i:
                    below = max(below, 1 + height[j])
                    mask |= bit[w] | reach[j]
                    wait = max(wait, own_wait(w), wait_max[j])
        if len(members) > 1:
            for v in members:
                mask |= bit[v]
                wait = max(wait, own_wait(v))
        height.append(below + len(members) - 1)
        reach.append(mask)
        wait_max.append(wait)

    roots = []
    for pid in pids:
        if waiters.get(pid) and pid not in blockers:
            i = component_of[pid]
            direct = 0
            for w in waiters[pid]:
                direct |= bit[w]
            roots.append(Root(pid, direct, reach[i], height[i], wait_max[i]))
    roots.sort(key=lambda r: (-r.blocked_transitive, -r.lock_wait_max_s, r.pid))
    cycles = []
    for i, members in enumerate(components):
        if len(members) > 1:
            own = 0
            for v in members:
                own |= bit[v]
            cycles.append(Cycle(tuple(members), reach[i] & ~own))
    cycles.sort(key=lambda c: (-c.blocked.bit_count(), c.pids))
    return Forest(nodes, tuple(roots), tuple(cycles), len(blockers))


# -- /api/blocking ----------------------------------------------------------------------------


def _for(seconds: float | None) -> str:
    return f" for {seconds:.1f} s" if seconds is not None and math.isfinite(seconds) else ""


def doing(
    pid: int, backend: Backend | None, state_age_s: float | None, lock_wait_s: float | None
) -> str:
    """What the backend is doing, in words: "idle in transaction for 12.3 s" (the usual
    root: a transaction left open while the code does something else), "waiting for a
    lock (transactionid) for 3.0 s", "active for 0.4 s"."""
    if pid == 0:
        return "prepared transaction (no session: COMMIT PREPARED or ROLLBACK PREPARED ends it)"
    if backend is None:
        return "not a client backend in the last poll (a background process, or it ended)"
    if backend.wait_event_type == "Lock":
        what = f"waiting for a lock ({backend.wait_event})" if backend.wait_event else "waiting"
        return what + _for(lock_wait_s)
    if backend.state in IDLE_IN_TRANSACTION:
        return backend.state + _for(state_age_s)
    if backend.state == "active":
        waits = (
            f", waiting on {backend.wait_event_type}:{backend.wait_event}"
            if backend.wait_event_type
            else ""
        )
        return "active" + _for(state_age_s) + waits
    return backend.state


def _no_sql(hold: dict[str, Any]) -> float | None:
    """Hold time without SQL (age − SQL time), or None while a statement runs: then the
    worker's SQL time is as of its last document, and the difference would count the
    running statement as idle."""
    sql = hold.get("sql_time_s")
    if hold.get("executing") or not isinstance(sql, (int, float)):
        return None
    return max(0.0, float(hold["age_s"]) - float(sql))


def node_json(node: Node, pg: PgView, now: float, template: str | None = None) -> dict[str, Any]:
    """One node: the server's side (aged to `now`, like `/api/checkouts`), then the hold's
    (null for an `unknown` node)."""
    b = node.backend
    hold = node.hold
    state_age = api.aged(b.state_age_s, pg.polled_at, now) if b else None
    lock_wait = api.aged(b.lock_wait_s, pg.polled_at, now) if b else None
    return {
        "pid": node.pid,
        "kind": "hold" if hold is not None else "unknown",
        "unknown_reason": node.unknown,
        "application_name": b.application_name if b else None,
        "server_state": b.state if b else None,
        "state_age_s": state_age,
        "xact_age_s": api.aged(b.xact_age_s, pg.polled_at, now) if b else None,
        "wait_event_type": b.wait_event_type if b else None,
        "wait_event": b.wait_event if b else None,
        "lock_wait_s": lock_wait,
        "doing": doing(node.pid, b, state_age, lock_wait),
        "blocked_by": list(node.blocked_by),
        "pool": hold["pool"] if hold else None,
        "site": hold.get("site") if hold else None,
        "thread": hold.get("thread") if hold else None,
        "task": hold.get("task") if hold else None,
        "process": hold.get("process") if hold else None,
        "age_s": hold["age_s"] if hold else None,
        "sql_time_s": hold.get("sql_time_s") if hold else None,
        "no_sql_s": _no_sql(hold) if hold else None,
        "executing": hold.get("executing") if hold else None,
        **api.trace_fields(hold or {}, template),
    }


def _listed(
    root: int,
    forest: Forest,
    render: Callable[[int], dict[str, Any]],
    max_depth: int,
    max_children: int,
    max_nodes: int,
) -> dict[str, Any]:
    """`root`'s tree, breadth first: each backend listed once (at its shallowest level;
    `blocked_by` names all its blockers), waiters that block others first, then the
    longest waits. `more` counts a node's waiters cut by the bounds."""
    nodes = forest.nodes

    def order(pid: int) -> tuple[bool, float, int]:
        b = nodes[pid].backend
        wait = b.lock_wait_s if b is not None and b.lock_wait_s is not None else 0.0
        return (not nodes[pid].waiters, -wait, pid)

    top = render(root)
    listed = {root}
    queue = deque([(top, root, 0)])
    while queue:
        out, pid, depth = queue.popleft()
        pending = sorted((w for w in nodes[pid].waiters if w not in listed), key=order)
        shown = []
        if depth < max_depth:
            for w in pending:
                if len(shown) >= max_children or len(listed) >= max_nodes:
                    break
                listed.add(w)
                shown.append(w)
        out["children"] = []
        for w in shown:
            child = render(w)
            out["children"].append(child)
            queue.append((child, w, depth + 1))
        out["more"] = len(pending) - len(shown)
    return top


def tree(
    view: View,
    pg: PgView,
    now: float | None = None,
    *,
    max_sample_age: float = api.MAX_SAMPLE_AGE_S,
    trace_url_template: str | None = None,
    max_depth: int = MAX_DEPTH,
    max_children: int = MAX_CHILDREN,
    max_nodes: int = MAX_NODES,
    max_roots: int = MAX_ROOTS,
) -> dict[str, Any]:
    """`/api/blocking`: the roots, most transitively blocked first, each with its blocked
    backends nested beneath (`children`), then any deadlock cycles. `server_unknown` says
    why no hold could be attributed at all (PostgreSQL down, or a sample older than
    `max_sample_age`), as `/api/checkouts` does per row."""
    now = time.time() if now is None else now
    forest = build(view, pg, now, max_sample_age)

    def render(pid: int) -> dict[str, Any]:
        return node_json(forest.nodes[pid], pg, now, trace_url_template)

    roots = []
    for root in forest.roots[:max_roots]:
        listed = _listed(root.pid, forest, render, max_depth, max_children, max_nodes)
        children, more = listed.pop("children"), listed.pop("more")
        roots.append(
            {
                **listed,
                "blocked_direct": root.blocked_direct,
                "blocked_transitive": root.blocked_transitive,
                "longest_chain": root.depth,
                "lock_wait_max_s": api.aged(root.lock_wait_max_s, pg.polled_at, now)
                if root.lock_wait_max_s
                else 0.0,
                "children": children,
                "more": more,
            }
        )
    cycles = [
        {
            "pids": list(cycle.pids),
            "nodes": [render(pid) for pid in cycle.pids[:max_children]],
            "blocked_transitive": cycle.blocked.bit_count(),
        }
        for cycle in forest.cycles[:MAX_CYCLES]
    ]
    return {
        "as_of": now,
        "server_as_of": pg.sampled_at if pg.up else None,
        "server_sample_age_s": max(0.0, now - pg.poll_started_at)
        if pg.up and pg.poll_started_at is not None
        else None,
        "server_unknown": api.sample_problem(pg, now, max_sample_age),
        "blocked_backends": forest.blocked,
        "roots": roots,
        "more_roots": max(0, len(forest.roots) - max_roots),
        "cycles": cycles,
        "more_cycles": max(0, len(forest.cycles) - MAX_CYCLES),
        "limits": {
            "max_depth": max_depth,
            "max_children": max_children,
            "max_nodes": max_nodes,
            "max_roots": max_roots,
        },
    }


# -- metrics ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteBlocking:
    """What the roots of one code site and pool block, for one set of metric labels."""

    code_site: str
    pool: str
    direct: int
    transitive: int
    lock_wait_max_s: float


def _merged(site: str, pool: str, roots: Sequence[Root]) -> SiteBlocking:
    """Several roots under one label set: distinct backends (a waiter blocked by two of
    them counts once), the longest wait."""
    direct = transitive = 0
    for r in roots:
        direct |= r.direct
        transitive |= r.transitive
    wait = max((r.lock_wait_max_s for r in roots), default=0.0)
    return SiteBlocking(site, pool, direct.bit_count(), transitive.bit_count(), wait)


def by_site(forest: Forest, max_series: int = MAX_SITE_SERIES) -> list[SiteBlocking]:
    """Per root blocker's (code site, pool): backends blocked directly and transitively,
    and the longest lock wait among them. Roots without an attributed hold are
    `(unknown)`/`(unknown)`. At most `max_series` label sets, the most transitively
    blocked; the rest add into `(other)`/`(other)`, so the cardinality is bounded
    whatever the number of roots."""
    groups: dict[tuple[str, str], list[Root]] = {}
    for root in forest.roots:
        hold = forest.nodes[root.pid].hold
        key = (str(hold.get("site") or UNKNOWN), str(hold["pool"])) if hold else (UNKNOWN, UNKNOWN)
        groups.setdefault(key, []).append(root)
    merged = sorted(
        (_merged(site, pool, roots) for (site, pool), roots in groups.items()),
        key=lambda s: (-s.transitive, -s.direct, s.code_site, s.pool),
    )
    if len(merged) <= max_series:
        return merged
    rest = [r for s in merged[max_series:] for r in groups[(s.code_site, s.pool)]]
    return [*merged[:max_series], _merged(OTHER, OTHER, rest)]


def longest_chain(forest: Forest) -> int:
    """Edges on the longest chain of lock waits under any root (0: nothing blocks)."""
    return max((r.depth for r in forest.roots), default=0)
