"""What counts as a role's process dying or hanging, as the drivers see it.

A call on an actor fails with one of FAULTS when the actor died, hung past its deadline, or
raised; `actor_fault` tells the first two (the actor must be replaced, the work done again) from
the third (a bug or bad data: doing it again would fail the same way).
"""

from __future__ import annotations

from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError


class RemoteCallError(RuntimeError):
    """A call on a rank failed or missed its deadline; names the group, rank and method. One
    that missed its deadline is raised from a GetTimeoutError, one whose actor died from the
    RayActorError."""


FAULTS = (RayActorError, RayTaskError, GetTimeoutError, RemoteCallError)


def actor_fault(e: BaseException) -> bool:
    """An actor died or hung (a call on an actor that has since been replaced fails so too)."""
    while isinstance(e, RemoteCallError) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, (RayActorError, GetTimeoutError)):
        return True
    return isinstance(e, RayTaskError) and isinstance(getattr(e, "cause", None), RayActorError)


def first_line(e: BaseException) -> str:
    """The error's type and the first line of its text, for a log line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
