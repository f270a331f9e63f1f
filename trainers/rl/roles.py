"""The RL stage's roles: every actor it runs, started together, replaced when one dies or hangs,
and the weight sync from the policy to the engines."""

from __future__ import annotations

from typing import Any, NamedTuple

import ray

from actors.joiner import Joiner
from actors.learner import LearnerGroup, ModelSpec
from actors.reward_fn import RewardFunction
from actors.scorers import ReferencePolicy, RewardModel
from cluster import ActorGroup, actor_fault, first_line
from cluster.colocated import PartGroup
from trainers.common import (
    autoscaling_timeout,
    engine_group,
    host_group,
    learner_group,
    optim_spec,
)
from trainers.config import RunConfig
from trainers.rl.inputs import RLInputs


class Reward(NamedTuple):
    """One source of the reward: its actor group, its weight in the sum, and whether it is
    given the prompts' records (functions and endpoints) or only the samples (the RM)."""

    group: ActorGroup
    weight: float
    takes_records: bool


class LearnerFault(RuntimeError):
    """A rank of the policy or critic group died or hangs: the groups go back to a checkpoint."""


class Roles:
    """Every actor of the PPO stage; shuts them all down on exit."""

    def __init__(self, config: RunConfig, inputs: RLInputs, log: Any = print) -> None:
        self.log = log
        self.groups: list[Any] = []
        try:
            self._start(config, inputs, log)
        except BaseException:
            self.__exit__()  # a role that fails to start takes down the ones already started
            raise

    def _start(self, config: RunConfig, inputs: RLInputs, log: Any) -> None:
        self.config, self.inputs = config, inputs
        self.colocated = config.placement == "colocated"
        self.sync = "local" if self.colocated else weight_sync_method(config)
        self.bucket_bytes = int(config.rollout.sync_bucket_mb * 2**20)
        self._sending: list[Any] = []  # the policy's refs of a broadcast sync under way
        self.policy: LearnerGroup
        self.critic: LearnerGroup | None = None  # only the GAE estimator learns values
        self.hosts = self._add(host_group(config, log)) if self.colocated else None
        if self.colocated:  # the learner ranks form the hosts' process group; engines join it
            self._learners(self.learner_names)
        self.engines = self._add(
            engine_group(config, inputs.policy, config.ppo.max_new_tokens, log, self.hosts)
        )
        # Joining a chunk's experience is a few tensor operations: the joiner reserves no CPU
        # (only the memory it holds), so it runs while the other actors hold every CPU.
        self.joiner = self._add(
            PartGroup(self.hosts, "joiner", Joiner)
            if self.hosts
            else ActorGroup(
                Joiner,
                1,
                name="joiner",
                num_cpus=0,
                memory_gb=0.5,
                placement_timeout_s=config.learner.placement_timeout_s,
                call_timeout_s=config.learner.collective_timeout_s,
            )
        )
        self.rewards = self._reward_sources(config, inputs, log)
        self.reward = self.rewards[0].group  # the RM when the reward has one, else its first
        self.reference = self._scorer(ReferencePolicy, "reference", config, inputs.policy, log)
        if not self.colocated:
            self._learners(self.learner_names)
        self.ptx_ref = ray.put(inputs.ptx)
        self.ptx_size = len(inputs.ptx)
        self.pad_id = int(inputs.tokenizer.pad_token_id)

    def _learners(self, names: list[str]) -> None:
        """Start the named groups (policy, critic) and build them from the run's starting
        models, all at once: their ranks start, connect and load in parallel with each other
        (and with the engines and scorers, which start meanwhile)."""
        config, cfg, r = self.config, self.config.ppo, self.config.rollout
        steps = cfg.iterations * cfg.epochs * (cfg.samples // cfg.minibatch_size)
        trust = config.trust_remote_code
        specs = {
            "policy": (
                config.learner,
                ModelSpec(
                    self.inputs.policy,
                    trust_remote_code=trust,
                    frozen_layers=cfg.policy_frozen_layers,
                ),
                optim_spec(cfg.policy_optim, steps),
            ),
            "critic": (
                cfg.critic,
                ModelSpec(
                    self.inputs.critic_model,
                    kind="reward",
                    trust_remote_code=trust,
                    frozen_layers=cfg.critic_frozen_layers,
                ),
                optim_spec(cfg.critic_optim, steps),
            ),
        }
        building = []
        for name in names:
            section, model, optim = specs[name]
            group = self._add(
                learner_group(
                    section, config.seed, name, cfg.minibatch_size, config.ray, self.log, self.hosts
                )
            )
            setattr(self, name, group)
            building.append((group, group.submit_build(model, optim)))
        for group, refs in building:
            group.finish_build(refs)
        if "policy" in names and self.sync == "broadcast":
            gpus = r.gpus_per_engine > 0 and config.learner.gpus_per_rank > 0
            self.policy.open_weight_group(
                self.engines, "nccl" if gpus else "gloo", config.learner.collective_timeout_s
            )

    @property
    def learner_names(self) -> list[str]:
        """The learner groups: the policy, and the critic when the estimator needs one."""
        return ["policy", "critic"] if self.config.ppo.uses_critic else ["policy"]

    def learners(self) -> dict[str, LearnerGroup]:
        return {name: getattr(self, name) for name in self.learner_names}

    def actor_groups(self) -> list[ActorGroup]:
        """The roles' groups of plain actors: engines, reward sources, reference, joiner."""
        return [self.engines, *(r.group for r in self.rewards), self.reference, self.joiner]

    def dead_learners(self) -> list[str]:
        """The learner groups (policy, critic) with a rank that died or does not answer; every
        group when a colocated host died (it held a rank of each)."""
        if self.hosts is not None:
            return self.learner_names if self.hosts.any_dead() else []
        return [g.group.name for g in self.learners().values() if g.group.any_dead()]

    def restart_learners(self, names: list[str]) -> None:
        """Start the named learner groups again from the run's starting models (the caller
        then loads the latest checkpoint into every group). Colocated: every role starts
        again, on new hosts."""
        if self.hosts is not None:
            self.__exit__()
            self.groups = []
            self._start(self.config, self.inputs, self.log)
            return
        for name in names:
            old = getattr(self, name)
            old.shutdown()
            self.groups.remove(old)
        self._learners(names)

    def replace_dead(
        self, version: int, cause: BaseException, with_weights: bool = True
    ) -> list[str]:
        """Replace every engine, reward, reference or joiner actor that died or hangs (a new
        actor in its place; an engine also gets the policy's current weights, as `version`,
        unless `with_weights` is False: the policy is coming back and syncs them after).
        Returns what was replaced. Colocated: nothing (a dead host takes a rank of the learners
        with it, and `dead_learners` names them)."""
        replaced: list[str] = []
        if self.hosts is not None:
            return replaced
        for group in self.actor_groups():
            for rank in range(group.n):
                if group.alive(rank):
                    continue
                self.log(f"ppo: {group.name} rank {rank} died or hangs ({first_line(cause)}); "
                         "replacing it")  # fmt: skip
                actor = group.replace(rank)
                if group is self.engines and with_weights:
                    weights = self.policy.publish_weights()
                    ray.get(
                        actor.load_weights.remote(weights, version), timeout=group.call_timeout_s
                    )
                replaced.append(f"{group.name}[{rank}]")
        return replaced

    def recover(self, version: int, cause: BaseException) -> list[str]:
        """`replace_dead`; if nothing was replaced: a LearnerFault if a policy or critic rank
        died or hangs (the stage's Recovery brings the groups back from a checkpoint); else, if
        `cause` is no actor's death or hang (a bug, bad data), `cause` again: it would fail the
        same way when issued again. The learners are asked only when nothing else was replaced:
        in overlapped mode they may be training, and would not answer until they finish. (An
        engine that died with a policy rank fails to take the dead policy's weights: that
        fault reaches the Recovery, which brings the groups back first.)"""
        replaced = self.replace_dead(version, cause)
        if not replaced:
            dead = self.dead_learners()
            if dead:  # a learner group comes back from a checkpoint: the Recovery does it
                raise LearnerFault(f"{' and '.join(dead)}: a rank died or hangs") from cause
            if not actor_fault(cause):
                raise cause
        return replaced

    def submit_sync(self, version: int) -> list[Any]:
        """Start sending the policy's weights to every engine, as `version`; returns the refs
        of the engines' loads (`finish_sync` waits for them)."""
        if self.sync == "broadcast":
            self._sending, receiving = self.policy.submit_broadcast(
                self.engines, version, self.bucket_bytes
            )
            return receiving
        if self.hosts is not None:  # each engine from the policy rank in its own process
            return self.hosts.submit(
                "handover", "policy", "full_weights", "rollout", "load_weights", version
            )
        return self.engines.submit("load_weights", self.policy.publish_weights(), version)

    def finish_sync(self, receiving: list[Any]) -> None:
        """Wait for a sync to end; a RemoteCallError names the engine that failed or hung."""
        sending, self._sending = self._sending, []
        if sending:  # the sender's error names an engine that did not answer
            self.policy.group.get(sending, "broadcast_weights")
        self.engines.get(receiving, f"{self.sync} weight sync")

    def sync_weights(self, version: int) -> None:
        """The policy's weights to every engine, as `version`, loaded when this returns."""
        self.finish_sync(self.submit_sync(version))

    def placement(self) -> dict[str, list[dict[str, Any]]]:
        """Where every rank of every role runs: {role: [{rank, node_id, ip, node_resources}]}."""
        groups = {g.name: g for g in self.actor_groups() if g is not self.joiner}
        groups.update({name: g.group for name, g in self.learners().items()})
        return {name: group.nodes() for name, group in groups.items()}

    def peak_memory_gb(self) -> dict[str, float]:
        """Each role's peak resident memory so far (GB; its largest rank); colocated, the
        workers' (every role's part of a worker reports the same process)."""
        if self.hosts is not None:
            return {"worker": max(m["rss_gb"] for m in self.joiner.call("peak_memory_gb"))}
        peaks = {
            group.name: max(m["rss_gb"] for m in group.call("peak_memory_gb"))
            for group in self.actor_groups()
        }
        return {**peaks, **{name: g.peak_memory_gb() for name, g in self.learners().items()}}

    @property
    def score_weights(self) -> tuple[float, ...]:
        """The reward sources' weights, in the order `score` returns their scores."""
        return tuple(r.weight for r in self.rewards)

    def _reward_sources(self, config: RunConfig, inputs: RLInputs, log: Any) -> list[Reward]:
        """An actor for each of the reward's sources, with its weight; the RM's first."""
        sources = sorted(config.reward.sources, key=lambda s: s.kind != "rm")
        out = []
        for i, src in enumerate(sources):
            if src.kind == "rm":
                group = self._scorer(RewardModel, "reward", config, inputs.reward_model, log)
            else:
                kwargs = {
                    "kind": src.kind,
                    "target": src.target,
                    "tokenizer_path": inputs.policy,
                    "timeout_s": src.timeout_s,
                    "retries": src.retries,
                    "backoff_s": src.backoff_s,
                    "on_error": config.reward.on_error,
                    "trust_remote_code": config.trust_remote_code,
                }
                name = f"reward_{src.kind}_{i}"
                group = self._scorer(RewardFunction, "reward", config, "", log, name, kwargs)
            out.append(Reward(group, src.weight, takes_records=src.kind != "rm"))
        return out

    def score(self, samples: Any, records: Any, chunk: int = 0) -> list[Any]:
        """Refs of each reward source's scores of a chunk's samples (records: their prompts'),
        on the source's actor `chunk` modulo their number (colocated: the chunk's host)."""
        return [
            r.group.actors[chunk % r.group.n].score.remote(
                samples, *([records] if r.takes_records else [])
            )
            for r in self.rewards
        ]

    def _scorer(
        self,
        cls: type,
        section: str,
        config: RunConfig,
        path: str,
        log: Any,
        name: str | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> ActorGroup:
        """One frozen scorer actor, sized by the config section `section`."""
        role = getattr(config, section)
        if self.hosts is not None:
            kwargs = kwargs or {
                "path": path,
                "batch_size": role.batch_size,
                "trust_remote_code": config.trust_remote_code,
            }
            return self._add(PartGroup(self.hosts, name or section, cls, kwargs))
        return self._add(
            ActorGroup(
                cls,
                1,
                name=name or section,
                num_cpus=role.cpus,
                num_gpus=role.gpus,
                memory_gb=role.memory_gb,
                resources=role.resources,
                placement_timeout_s=config.learner.placement_timeout_s,
                autoscaling_timeout_s=autoscaling_timeout(config.ray),
                log=log,
                call_timeout_s=config.learner.collective_timeout_s,
                actor_kwargs=kwargs
                or {
                    "path": path,
                    "batch_size": role.batch_size,
                    "trust_remote_code": config.trust_remote_code,
                },
            )
        )

    def _add(self, group: Any) -> Any:
        self.groups.append(group)
        return group

    def __enter__(self) -> Roles:
        return self

    def __exit__(self, *exc: object) -> None:
        for group in reversed(self.groups):
            group.shutdown()


def weight_sync_method(config: RunConfig) -> str:
    """rollout.weight_sync, with auto resolved: the broadcast, which bench/weight_sync.py
    measured at about twice the object store's speed on the CPU at every size from 1M to 86M
    parameters (gloo). On GPUs (NCCL) it is what the field uses; not measured here yet."""
    method = config.rollout.weight_sync
    return "broadcast" if method == "auto" else method
