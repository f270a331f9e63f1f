"""A group of N ranked Ray actors placed together by a placement group.

The group is generic: it creates one actor per rank from any class, places them (PACK for
learner ranks, SPREAD for engines), and calls a method on every rank, either with the same
arguments or with one slice per rank (each slice is put in the object store on its own, so a rank
fetches only its share). Every call has a deadline: a rank that does not answer in time is named
in the error instead of hanging the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


class PlacementError(RuntimeError):
    """The cluster cannot place a group: says what was asked for and what exists."""


class RemoteCallError(RuntimeError):
    """A call on a rank failed or missed its deadline; names the group, rank and method."""


def _bundle(num_cpus: float, num_gpus: float, extra: dict[str, float] | None) -> dict[str, float]:
    bundle = {"CPU": float(num_cpus)}
    if num_gpus:
        bundle["GPU"] = float(num_gpus)
    bundle.update(extra or {})
    return bundle


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
        resources: dict[str, float] | None = None,
        strategy: str = "PACK",
        placement_timeout_s: float = 120.0,
        call_timeout_s: float | None = 600.0,
        actor_kwargs: dict[str, Any] | None = None,
        env_vars: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.n = n
        self.call_timeout_s = call_timeout_s
        bundle = _bundle(num_cpus, num_gpus, resources)
        self._check_feasible(bundle, n)
        self.placement_group = placement_group([dict(bundle) for _ in range(n)], strategy=strategy)
        if not self.placement_group.wait(timeout_seconds=placement_timeout_s):
            remove_placement_group(self.placement_group)
            raise PlacementError(
                f"{name}: {n} × {bundle} could not be placed within {placement_timeout_s:.0f} s; "
                f"the cluster has {_fmt(ray.cluster_resources())}, free now "
                f"{_fmt(ray.available_resources())}"
            )
        remote_cls = ray.remote(actor_cls)
        options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if resources:
            options["resources"] = resources
        if env_vars:
            options["runtime_env"] = {"env_vars": env_vars}
        self.actors = [
            remote_cls.options(
                **options,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=rank
                ),
            ).remote(rank=rank, world_size=n, **(actor_kwargs or {}))
            for rank in range(n)
        ]

    def _check_feasible(self, bundle: dict[str, float], n: int) -> None:
        total = ray.cluster_resources()
        short = {k: v * n for k, v in bundle.items() if v * n > total.get(k, 0.0) + 1e-9}
        if short:
            raise PlacementError(
                f"{self.name}: needs {n} × {bundle} = {_fmt({k: v * n for k, v in bundle.items()})}"
                f" but the whole cluster has {_fmt(total)}; lower the group's size or its "
                "resources per rank, or add nodes"
            )

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
        """Results of `refs` (one per rank), or a RemoteCallError naming the rank that failed."""
        deadline = self.call_timeout_s if timeout_s is None else timeout_s
        results: list[Any] = []
        for rank, ref in enumerate(refs):
            try:
                results.append(ray.get(ref, timeout=deadline))
            except GetTimeoutError:
                raise RemoteCallError(
                    f"{self.name} rank {rank}: {method} did not finish within {deadline:.0f} s"
                ) from None
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


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if not k.startswith(("node:", "memory", "object"))}
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
