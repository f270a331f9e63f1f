"""Ray itself: start or join a cluster, place groups of ranked actors, and run calls on them.

Knows nothing of models or RL: `actors/` builds on it, `trainers/` drives it.
"""

from cluster.faults import FAULTS, RemoteCallError, actor_fault, first_line
from cluster.groups import ActorGroup, PlacementError
from cluster.runtime import RayRuntime

__all__ = [
    "FAULTS",
    "ActorGroup",
    "PlacementError",
    "RayRuntime",
    "RemoteCallError",
    "actor_fault",
    "first_line",
]
