"""Colocated placement: one process per device hosting a part of every role.

A `Host` actor holds several objects ("parts": a learner rank, a rollout engine, a scorer) that
take turns on its device, as veRL's hybrid engine and OpenRLHF's `colocate_all` do. A
`PartGroup` is one role's view of a group of hosts: part `name` of every host, behind the same
interface as an `ActorGroup` of plain actors, so the code that drives a role does not know where
the role lives. A call to a part runs in its host's process, in the order the host received its
calls; object refs among the arguments arrive as their values, as for a plain actor.

A part cannot be replaced alone (its host's other parts would go with it): when a host dies, the
whole group of hosts starts again (`PartGroup.replace` says so in a RemoteCallError).
"""

from __future__ import annotations

import contextlib
import gc
from typing import Any

from cluster.faults import RemoteCallError
from cluster.groups import ActorGroup


class Host:
    """One process of the colocated placement: rank `rank` of `world_size` hosts."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.parts: dict[str, Any] = {}

    def add_part(self, name: str, cls: type, kwargs: dict[str, Any]) -> None:
        """Build `cls(rank=rank, world_size=world_size, **kwargs)` as part `name`."""
        self.parts[name] = cls(rank=self.rank, world_size=self.world_size, **kwargs)

    def drop_part(self, name: str) -> None:
        self.parts.pop(name, None)
        gc.collect()

    def part_call(self, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method(*args, **kwargs)` of part `name`."""
        return getattr(self.parts[name], method)(*args, **kwargs)

    def handover(self, source: str, get: str, target: str, put: str, *args: Any) -> Any:
        """`target.put(source.get(), *args)` within the process: what one part gives another
        (the policy's weights to the engine) is never copied between processes."""
        return getattr(self.parts[target], put)(getattr(self.parts[source], get)(), *args)


class _PartMethod:
    def __init__(self, actor: Any, part: str, method: str, options: dict[str, Any]) -> None:
        self.actor, self.part, self.method, self.opts = actor, part, method, options

    def options(self, **options: Any) -> _PartMethod:
        return _PartMethod(self.actor, self.part, self.method, {**self.opts, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        call = self.actor.part_call
        if self.opts:
            call = call.options(**self.opts)
        return call.remote(self.part, self.method, *args, **kwargs)


class PartHandle:
    """A part of a host, used like an actor handle: `handle.method.remote(...)`."""

    def __init__(self, actor: Any, part: str) -> None:
        self.actor, self.part = actor, part

    @property
    def _actor_id(self) -> Any:
        return self.actor._actor_id

    @property
    def __ray_ready__(self) -> Any:
        return self.actor.__ray_ready__

    def __getattr__(self, method: str) -> _PartMethod:
        if method.startswith("__"):
            raise AttributeError(method)
        return _PartMethod(self.actor, self.part, method, {})


class PartGroup(ActorGroup):
    """Part `part` (`cls(rank, world_size, **kwargs)`) of every host of `hosts`, with the
    interface of an ActorGroup. Built on each host in the order of the hosts' other calls."""

    def __init__(
        self,
        hosts: ActorGroup,
        part: str,
        cls: type,
        kwargs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.hosts, self.part = hosts, part
        self.name = name or part
        self.n = hosts.n
        self.call_timeout_s = hosts.call_timeout_s
        self.bundle = hosts.bundle
        self.placement_group = hosts.placement_group
        self.replaced = 0
        self._cls, self._actor_kwargs = cls, dict(kwargs or {})
        self.actors = [PartHandle(a, part) for a in hosts.actors]
        for handle in self.actors:  # the part's first call waits behind its building
            handle.actor.add_part.remote(part, cls, self._actor_kwargs)

    def replace(self, rank: int, timeout_s: float | None = None) -> Any:
        raise RemoteCallError(
            f"{self.name} rank {rank}: a colocated role is not replaced alone; its host "
            "starts again with every role"
        )

    def shutdown(self) -> None:
        """Drop the part from every live host (the hosts stay; their group ends them)."""
        for handle in self.actors:
            with contextlib.suppress(Exception):  # a dead host has nothing left to drop
                handle.actor.drop_part.remote(self.part)
        self.actors = []


__all__ = ["Host", "PartGroup", "PartHandle"]
