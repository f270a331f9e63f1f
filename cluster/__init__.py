"""Ray itself: start or join a cluster, place groups of ranked actors, and run calls on them.

Knows nothing of models or RL: `actors/` builds on it, `trainers/` drives it.
"""

from cluster.groups import ActorGroup, PlacementError, RemoteCallError
from cluster.runtime import RayRuntime

__all__ = ["ActorGroup", "PlacementError", "RayRuntime", "RemoteCallError"]
