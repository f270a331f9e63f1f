"""A group of N ranked Ray actors placed together by a placement group.

The group is generic: it creates one actor per rank from any class, places them (PACK for
learner ranks, SPREAD for engines), and calls a method on every rank, either with the same
arguments or with one slice per rank (each slice is put in the object store on its own, so a rank
fetches only its share). Every call has a deadline: a rank that does not answer in time is named
in the error instead of hanging the run.

Placement fails fast when no node of the cluster could ever host a rank (or the whole cluster
could not host the group), listing what was asked and what each node has. On a cluster with an
autoscaler (`autoscaling_timeout_s` set) the group instead waits for new nodes, saying so, up to
that timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.faults import RemoteCallError


class PlacementError(RuntimeError):
    """The cluster cannot place a group: says what was asked for and what exists."""


GiB = 1024**3


def _bundle(
    num_cpus: float, num_gpus: float, memory_gb: float, extra: dict[str, float] | None
) -> dict[str, float]:
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    if memory_gb:
        bundle["memory"] = float(int(memory_gb * GiB))
    bundle.update(extra or {})
    return bundle


def _fits(bundle: dict[str, float], have: dict[str, float]) -> bool:
    return all(have.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's live nodes: [{node_id, ip, resources}]."""
    return [
        {"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "resources": n["Resources"]}
        for n in ray.nodes()
        if n["Alive"]
    ]


class ActorGroup:
    """N actors of `actor_cls`; rank i is `actor_cls(rank=i, world_size=N, **actor_kwargs)`."""

    def __init__(
        self,
        actor_cls: type,
        n: int,
        *,
        name: str,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        memory_gb: float = 0.0,
        resources: dict[str, float] | None = None,
        strategy: str = "PACK",
        placement_timeout_s: float = 120.0,
        autoscaling_timeout_s: float | None = None,
        call_timeout_s: float | None = 600.0,
        start_timeout_s: float = 600.0,
        actor_kwargs: dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
        log: Callable[[str], None] = print,
    ) -> None:
        self.name = name
        self.n = n
        self.call_timeout_s = call_timeout_s
        # a start is no call: a new process imports, loads its model and may compile it first
        self.start_timeout_s = start_timeout_s
        self.bundle = _bundle(num_cpus, num_gpus, memory_gb, resources)
        fits_now = self._check_feasible(
            self.bundle, n, autoscaling=autoscaling_timeout_s is not None
        )
        self.placement_group = placement_group(
            [dict(self.bundle) for _ in range(n)], strategy=strategy
        )
        if fits_now or autoscaling_timeout_s is None:
            placed = self.placement_group.wait(timeout_seconds=placement_timeout_s)
            waited = placement_timeout_s
        else:
            waited = autoscaling_timeout_s
            placed = self._wait_for_autoscaler(autoscaling_timeout_s, log)
        if not placed:
            remove_placement_group(self.placement_group)
            raise PlacementError(
                f"{name}: {n} × {format_resources(self.bundle)} could not be placed within "
                f"{waited:.0f} s; "
                f"the cluster has {format_resources(ray.cluster_resources())}, free now "
                f"{format_resources(ray.available_resources())}"
            )
        remote_cls = ray.remote(actor_cls)
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if memory_gb:
            options["memory"] = int(memory_gb * GiB)
        if resources:
            options["resources"] = resources
        if env_vars:
            options["runtime_env"] = {"env_vars": env_vars}
        self._remote_cls, self._options = remote_cls, options
        self._actor_kwargs = dict(actor_kwargs or {})
        self.replaced = 0
        self.actors = [self._start(rank) for rank in range(n)]

    def _start(self, rank: int) -> Any:
        return self._remote_cls.options(
            **self._options,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.placement_group, placement_group_bundle_index=rank
            ),
        ).remote(rank=rank, world_size=self.n, **self._actor_kwargs)

    # -- faults ------------------------------------------------------------------------------

    def alive(self, rank: int, timeout_s: float = 30.0) -> bool:
        """Whether rank answers within `timeout_s` (an actor busy in a long call does not: it
        is single-threaded, so a hung actor counts as dead)."""
        try:
            ray.get(self.actors[rank].__ray_ready__.remote(), timeout=timeout_s)
            return True
        except (GetTimeoutError, RayActorError, RayTaskError):
            return False

    def any_dead(self, timeout_s: float = 30.0) -> bool:
        """Whether some rank died or does not answer within `timeout_s`; all ranks are asked at
        once, and a dead one answers at once (the others may be blocked in a collective with
        it)."""
        pending = [a.__ray_ready__.remote() for a in self.actors]
        end = time.monotonic() + timeout_s
        while pending:
            left = max(0.0, end - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                return True
            try:
                ray.get(ready[0])
            except (RayActorError, RayTaskError):
                return True
        return False

    def replace(self, rank: int, timeout_s: float | None = None) -> Any:
        """End rank (dead or hung) and start a new actor in its place, in the same bundle of the
        placement group; returns the new handle once it answers (within `timeout_s`, by default
        the group's `start_timeout_s`, however short its calls' deadline)."""
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._start(rank)
        self.replaced += 1
        deadline = self.start_timeout_s if timeout_s is None else timeout_s
        try:
            ray.get(self.actors[rank].__ray_ready__.remote(), timeout=deadline)
        except (GetTimeoutError, RayActorError, RayTaskError) as e:
            raise RemoteCallError(
                f"{self.name} rank {rank}: its replacement did not start: {e}"
            ) from e
        return self.actors[rank]

    def _check_feasible(self, bundle: dict[str, float], n: int, autoscaling: bool) -> bool:
        """True if the cluster as it is could host the group. False if it could not but an
        autoscaler may add nodes; without one, a PlacementError that lists asked and existing."""
        nodes = alive_nodes()
        total = ray.cluster_resources()
        asked = {k: v * n for k, v in bundle.items()}
        one_node = any(_fits(bundle, node["resources"]) for node in nodes)
        if one_node and _fits(asked, total):
            return True
        if autoscaling:
            return False
        listing = "; ".join(f"{node['ip']} {format_resources(node['resources'])}" for node in nodes)
        problem = (
            f"no node can host one rank of {format_resources(bundle)}"
            if not one_node
            else f"the whole cluster has {format_resources(total)}"
        )
        raise PlacementError(
            f"{self.name}: needs {n} × {format_resources(bundle)} = {format_resources(asked)} "
            f"but {problem}. "
            f"Nodes: {listing}. Lower the group's size or its resources per rank, add nodes, or "
            "set ray.autoscaling if the cluster has an autoscaler"
        )

    def _wait_for_autoscaler(self, timeout_s: float, log: Callable[[str], None]) -> bool:
        log(
            f"{self.name}: {self.n} × {format_resources(self.bundle)} does not fit the cluster as "
            f"it is ({format_resources(ray.cluster_resources())}); waiting up to {timeout_s:.0f} s "
            "for the "
            "autoscaler to add nodes"
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.placement_group.wait(timeout_seconds=min(30.0, deadline - time.monotonic())):
                log(
                    f"{self.name}: placed after the cluster grew to "
                    f"{format_resources(ray.cluster_resources())}"
                )
                return True
            left = deadline - time.monotonic()
            if left > 0:
                log(f"{self.name}: still waiting for nodes ({left:.0f} s left)")
        return False

    def nodes(self) -> list[dict[str, Any]]:
        """Where each rank runs: [{rank, node_id, ip, node_resources}], in rank order."""
        by_bundle = placement_group_table(self.placement_group)["bundles_to_node_id"]
        info = {node["node_id"]: node for node in alive_nodes()}
        out = []
        for rank in range(self.n):
            node = info.get(by_bundle[rank], {"ip": "?", "resources": {}})
            out.append(
                {
                    "rank": rank,
                    "node_id": by_bundle[rank],
                    "ip": node["ip"],
                    "node_resources": _custom(node["resources"]),
                }
            )
        return out

    # -- calls -------------------------------------------------------------------------------

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start `method(*args, **kwargs)` on every rank; returns the refs."""
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def submit_each(self, method: str, per_rank: Sequence[Any], **kwargs: Any) -> list[Any]:
        """Start `method(per_rank[i], **kwargs)` on rank i, each slice its own object."""
        if len(per_rank) != self.n:
            raise ValueError(f"{self.name}: {len(per_rank)} slices for {self.n} ranks")
        refs = [ray.put(part) for part in per_rank]
        return [
            getattr(a, method).remote(ref, **kwargs)
            for a, ref in zip(self.actors, refs, strict=True)
        ]

    def get(self, refs: list[Any], method: str, timeout_s: float | None = None) -> list[Any]:
        """Results of `refs` (one per rank), or a RemoteCallError naming the rank that failed.
        The first rank to fail ends the wait: the others may be blocked in a collective with
        it, and would only give up at their own deadline."""
        deadline = self.call_timeout_s if timeout_s is None else timeout_s
        end = None if deadline is None else time.monotonic() + deadline
        results: list[Any] = [None] * len(refs)
        pending = {ref: rank for rank, ref in enumerate(refs)}
        while pending:
            left = None if end is None else max(0.0, end - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left, fetch_local=False)
            if not ready:
                rank = min(pending.values())
                late = f"{self.name} rank {rank}: {method} did not finish within {deadline:.0f} s"
                raise RemoteCallError(late) from GetTimeoutError(late)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    raise RemoteCallError(f"{self.name} rank {rank}: {method} failed: {e}") from e
        return results

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """`method` on every rank with the same arguments; waits for all."""
        return self.get(self.submit(method, *args, **kwargs), method)

    def call_each(self, method: str, per_rank: Sequence[Any], **kwargs: Any) -> list[Any]:
        """`method` on rank i with `per_rank[i]`; waits for all."""
        return self.get(self.submit_each(method, per_rank, **kwargs), method)

    def call_rank(self, rank: int, method: str, *args: Any, **kwargs: Any) -> Any:
        ref = getattr(self.actors[rank], method).remote(*args, **kwargs)
        return self.get([ref], method)[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        remove_placement_group(self.placement_group)

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _custom(resources: dict[str, float]) -> dict[str, float]:
    """A node's resources as a user names them: without Ray's per-node and store entries."""
    return {
        k: v
        for k, v in resources.items()
        if not k.startswith(("node:", "object_store", "accelerator_type:")) and k != "memory"
    }


def format_resources(resources: dict[str, float]) -> str:
    """Resources as a user reads them: `{CPU: 2, GPU: 1, rollout_node: 1}`."""
    keep = _custom(resources)
    if resources.get("memory"):
        keep["memory_gb"] = round(resources["memory"] / GiB, 1)
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"


def split_evenly(items: Sequence[Any], n: int) -> list[list[Any]]:
    """Split `items` into n contiguous parts whose sizes differ by at most one."""
    q, r = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + q + (1 if i < r else 0)
        out.append(list(items[start:end]))
        start = end
    return out
