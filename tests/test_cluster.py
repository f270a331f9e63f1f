"""Running on a cluster: the launcher configs, placement per role from the run config, rollout
engines scaled by the config, and a job submitted to a real multi-node Ray cluster with token
authentication that Ray's fake multi-node autoscaler grows for the run's engines."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.localnodes import LocalNodes
from tests.conftest import ROOT

LAUNCHER_CONFIGS = ("cluster.yaml", "cluster-onprem.yaml")


def _schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.unit
@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_validates_against_rays_schema(name: str) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    jsonschema.validate(raw, _schema())
    # as `ray up` does: Ray's defaults filled in, then its own checks
    validate_config(prepare_config(copy.deepcopy(raw)))
    # token authentication on every node, dashboard and job server on loopback
    starts = raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])
    # and the check can fail: a misspelt field is refused
    broken = copy.deepcopy(raw)
    broken["setup_comands"] = broken.pop("setup_commands")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, _schema())


@pytest.mark.unit
def test_cluster_run_config_asks_only_for_what_the_node_types_offer() -> None:
    """Every role of configs/cluster-gpu.yaml fits one rank on a node type of cluster.yaml, and
    the custom resource that places it names that type's role."""
    from trainers.config import load_config

    config = load_config(ROOT / "configs" / "cluster-gpu.yaml")
    types = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    roles = {
        "learner": (config.learner.cpus_per_rank, config.learner.gpus_per_rank,
                    config.learner.resources_per_rank),
        "critic": (config.ppo.critic.cpus_per_rank, config.ppo.critic.gpus_per_rank,
                   config.ppo.critic.resources_per_rank),
        "rollout": (config.rollout.cpus_per_engine, config.rollout.gpus_per_engine,
                    config.rollout.resources_per_engine),
        "reward": (config.reward.cpus, config.reward.gpus, config.reward.resources),
        "reference": (config.reference.cpus, config.reference.gpus, config.reference.resources),
    }  # fmt: skip
    for role, (cpus, gpus, custom) in roles.items():
        ask = {"CPU": cpus, "GPU": gpus, **custom}
        hosts = [
            name
            for name, t in types.items()
            if all(t["resources"].get(k, 0) >= v for k, v in ask.items() if v)
        ]
        assert hosts, f"{role}: no node type offers {ask}"
        assert custom, f"{role}: not pinned to a node type"
    assert config.ray.autoscaling


@pytest.mark.unit
def test_custom_resources_that_are_built_in_are_refused_naming_the_field() -> None:
    from trainers.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"rollout.resources_per_engine: 'GPU' is not a custom"):
        load_config(ROOT / "configs" / "tiny.yaml", ["rollout.resources_per_engine={GPU: 1}"])
    with pytest.raises(ConfigError, match=r"reward.resources: rollout_node must be > 0"):
        load_config(ROOT / "configs" / "tiny.yaml", ["reward.resources={rollout_node: 0}"])


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "trainers.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.unit
def test_submit_checks_the_config_and_the_secrets_before_it_contacts_a_cluster(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "RAY_ADDRESS")}
    nowhere = "http://127.0.0.1:9"  # nothing listens: these must fail before any request
    bad = _cli("submit", "configs/tiny.yaml", "rollout.engine=2", "--address", nowhere, env=env)
    assert bad.returncode == 2 and "rollout.engine: unknown field" in bad.stderr
    online = _cli("submit", "configs/tiny.yaml", "wandb.mode=online", "--address", nowhere, env=env)
    assert online.returncode == 2 and "WANDB_API_KEY is not set" in online.stderr
    outside = tmp_path / "run.yaml"
    outside.write_text((ROOT / "configs" / "tiny.yaml").read_text())
    far = _cli("submit", str(outside), "--address", nowhere, env=env)
    assert far.returncode == 2 and "inside the working directory" in far.stderr
    down = _cli("submit", "configs/tiny.yaml", "--address", nowhere, env=env)
    assert (
        down.returncode == 2 and "cannot reach the job server at http://127.0.0.1:9" in down.stderr
    )


class _Idle:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank


@pytest.mark.integration
def test_a_role_that_no_node_can_host_fails_at_once_listing_the_nodes(ray_cluster) -> None:
    from cluster import ActorGroup, PlacementError

    with pytest.raises(PlacementError) as e:
        ActorGroup(_Idle, 1, name="rollout", num_cpus=0.1, resources={"rollout_node": 1})
    message = str(e.value)
    assert "rollout: needs 1 × {CPU: 0.1, rollout_node: 1}" in message
    assert "no node can host one rank" in message
    assert "Nodes: " in message and "{CPU: 2" in message


@pytest.mark.integration
def test_a_replacement_gets_the_start_deadline_not_the_calls(ray_cluster, tmp_path: Path) -> None:
    """A role's calls may have a short deadline (learner.collective_timeout_s, to find a hung
    rank soon); its replacement, a new process that imports and loads its model, is waited for
    up to the start deadline, and one that does not start within it fails naming the role."""
    import time

    import ray

    from cluster import ActorGroup, RemoteCallError
    from tests.chaos import SlowToComeBack

    kwargs = {"marker": str(tmp_path / "started"), "delay_s": 4.0}
    with ActorGroup(
        SlowToComeBack, 1, name="reference", num_cpus=0.1, call_timeout_s=1.0,
        start_timeout_s=60.0, actor_kwargs=kwargs,
    ) as group:  # fmt: skip
        group.any_dead(timeout_s=60)
        t = time.perf_counter()
        actor = group.replace(0)
        assert time.perf_counter() - t >= 4.0  # it waited for the start, past the calls' 1 s
        ray.get(actor.__ray_ready__.remote(), timeout=5)
        assert group.replaced == 1
    slow = ActorGroup(
        SlowToComeBack, 1, name="reference", num_cpus=0.1, start_timeout_s=1.0,
        actor_kwargs=kwargs,
    )  # fmt: skip
    with slow, pytest.raises(RemoteCallError, match="reference rank 0: its replacement did not"):
        slow.replace(0)


@pytest.mark.integration
def test_a_role_that_cannot_be_placed_takes_down_the_roles_already_started(demo_run) -> None:
    """The critic asks for a resource no node has: the PPO roles fail to start, naming it, and
    the engine, scorers and policy that had started are gone, their CPUs free again."""
    import time

    import ray

    from cluster import PlacementError
    from trainers.common import check_model_folder
    from trainers.config import load_config
    from trainers.pipeline import prepare_ppo, resolve_paths
    from trainers.rl.roles import Roles

    out, _ = demo_run
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"output_dir={out}", "ppo.critic.resources_per_rank={critic_node: 1}"],
    )
    paths = resolve_paths(config)
    inputs = prepare_ppo(
        config, paths, check_model_folder(paths.ppo_policy, "ppo.policy"), lambda _: None
    )
    with pytest.raises(PlacementError) as e:
        Roles(config, inputs, log=lambda _: None)
    assert "critic: needs 1 × {CPU: 0.25, critic_node: 1}" in str(e.value)
    deadline = time.time() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


@pytest.mark.integration
def test_two_engines_both_generate_and_the_learners_logprobs_match_theirs(demo_run) -> None:
    """Two engines share an iteration's chunks. With ppo.old_logprobs=learner, the policy's own
    log-probs join each sample: in the synchronous mode they come from the weights the engines
    sampled with, so they match the engines' and every token's weight is 1."""
    import ray

    from trainers.common import check_model_folder
    from trainers.config import load_config
    from trainers.pipeline import prepare_ppo, resolve_paths
    from trainers.rl.iteration import iteration
    from trainers.rl.roles import Roles
    from trainers.rl.state import DriverState

    out, _ = demo_run
    engines = 2  # one engine is what every other PPO test runs
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [
            f"output_dir={out}",
            f"rollout.engines={engines}",
            "rollout.cpus_per_engine=0.25",
            "rollout.chunk_size=8",
            "ppo.rollout_batch=32",
            "learner.ranks=1",
            "ppo.old_logprobs=learner",
        ],
    )
    paths = resolve_paths(config)
    inputs = prepare_ppo(
        config, paths, check_model_folder(paths.ppo_policy, "ppo.policy"), lambda _: None
    )
    with Roles(config, inputs) as roles:
        assert len(roles.engines.actors) == engines
        placed = roles.placement()["rollout"]
        assert [r["rank"] for r in placed] == list(range(engines))
        figures, experience = iteration(config, roles, DriverState.start(config, inputs.prompts))
        samples = [s for chunk in ray.get(experience) for s in chunk]
    assert len(samples) == 32
    # 4 chunks of 8 dealt in turn: each engine generated its share
    assert {s["engine"] for s in samples} == set(range(engines))
    for e in range(engines):
        assert figures[f"rollout/samples_engine_{e}"] == 32 / engines
    for s in samples:
        assert s["learner_logprobs"] == pytest.approx(s["logprobs"], abs=1e-3)
    assert 0.0 <= figures["behavior_kl"] < 1e-5
    assert figures["behavior_weight"] == pytest.approx(1.0, abs=1e-3)


# -- real multi-node clusters on this machine ------------------------------------------------


def _ppo_only(demo: Path, run_dir: Path, iterations: int, short_eval: list[str]) -> list[str]:
    """Overrides: a short PPO stage from the demo run's SFT model and RM, evaluated on a few
    held-out prompts."""
    return [
        *short_eval,
        "stages=[ppo]",
        f"output_dir={run_dir}",
        "task.seed=0",
        f"ppo.policy={demo / 'sft' / 'model'}",
        f"ppo.reward_model={demo / 'rm' / 'model'}",
        f"ppo.iterations={iterations}",
        "ppo.checkpoint_every=1000",
    ]


def _nodes_by_id(nodes: LocalNodes) -> dict[str, dict]:
    """Every node of the cluster as Ray's state API reports it (not as the run reports it)."""
    listed = nodes.cli(
        str(Path(sys.executable).parent / "ray"),
        "list",
        "nodes",
        f"--address={nodes.dashboard}",
        "--format=json",
        "--detail",
    )
    assert listed.returncode == 0, listed.stderr
    return {n["node_id"]: n for n in json.loads(listed.stdout)}


def _files_containing(folder: Path, needle: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.integration
def test_a_submitted_run_grows_the_cluster_and_places_each_role_on_the_node_its_resources_name(
    demo_run, short_eval, ray_cluster, tmp_path: Path
) -> None:
    """A job submitted to a two-node-type cluster with token authentication and Ray's fake
    multi-node autoscaler: the engines do not fit the head, the run waits for the autoscaler,
    which adds a rollout node for each engine; every role runs on the node its resources name."""
    import ray

    demo, _ = demo_run
    run_dir = tmp_path / "run"
    key = "planted-wandb-key-" + os.urandom(8).hex()
    with LocalNodes() as nodes:
        head = {"CPU": 2, "learner_node": 4}
        spec = tmp_path / "autoscaler.json"
        # a rollout node takes one engine (1.5 of its 2 rollout_node) and a scorer or two
        rollout_node = {"CPU": 1, "rollout_node": 2}
        workers = {
            "rollout": {
                "resources": rollout_node,
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            }
        }
        spec.write_text(json.dumps(_fake_autoscaler(nodes.address, head, workers)))
        nodes.start_head(
            2,
            {"learner_node": 4},
            autoscaling_config=spec,
            extra_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"},
        )
        assert len(_nodes_by_id(nodes)) == 1

        # token authentication is on: a client without the token is refused, and told why
        no_token = {k: v for k, v in nodes.env.items() if not k.startswith("RAY_AUTH")}
        refused = _cli("jobs", "--address", nodes.dashboard, env=no_token)
        assert refused.returncode == 2 and "RAY_AUTH_TOKEN" in refused.stderr

        submitted = _cli(
            "submit",
            "configs/tiny.yaml",
            *_ppo_only(demo, run_dir, iterations=3, short_eval=short_eval),
            "learner.resources_per_rank={learner_node: 1}",
            "ppo.critic.resources_per_rank={learner_node: 1}",
            "rollout.engines=2",
            "rollout.cpus_per_engine=0.5",
            "rollout.resources_per_engine={rollout_node: 1.5}",
            "reward.resources={rollout_node: 0.25}",
            "reference.resources={rollout_node: 0.25}",
            "ray.autoscaling=true",
            "ray.autoscaling_timeout_s=300",
            "--address",
            nodes.dashboard,
            "--job-id",
            "grown-ppo",
            "--follow",
            env={**nodes.env, "WANDB_API_KEY": key},
            timeout=900,
        )
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        assert "job grown-ppo: SUCCEEDED" in submitted.stdout
        assert "rollout: 2 × {CPU: 0.5, rollout_node: 1.5} does not fit" in submitted.stdout
        assert "waiting up to 300 s for the autoscaler" in submitted.stdout
        assert f"W&B (offline): {run_dir / 'wandb'}" in submitted.stdout

        # the figures of the PPO stage
        summary = json.loads((run_dir / "summary.json").read_text())
        ppo, sft = summary["ppo"], summary["sft"]
        assert ppo["iterations"] == 3
        for figure in ("winrate_vs_sft", "labeler_score", "kl_to_sft", "heldout_demo_loss"):
            assert figure in ppo
        assert ppo["rm_score"] > sft["rm_score"]
        assert ppo["tokens_per_second"] > 0

        # the cluster grew by two rollout nodes, the engines ran there, one on each, and each
        # other role ran on the node that offers the resource it asked for
        listed = _nodes_by_id(nodes)
        added = {i for i, n in listed.items() if "rollout_node" in n["resources_total"]}
        assert len(listed) == 3 and len(added) == 2
        placement = json.loads((run_dir / "ppo" / "placement.json").read_text())
        assert sorted(rank["node_id"] for rank in placement["rollout"]) == sorted(added)
        wanted = {"reward": "rollout_node", "reference": "rollout_node"}
        wanted |= {"policy": "learner_node", "critic": "learner_node"}
        for role, resource in wanted.items():
            for rank in placement[role]:
                assert resource in listed[rank["node_id"]]["resources_total"], (role, rank)

        # the other job commands
        jobs = _cli("jobs", "--address", nodes.dashboard, env=nodes.env)
        assert jobs.returncode == 0 and "grown-ppo  SUCCEEDED" in jobs.stdout
        logs = _cli("logs", "grown-ppo", "--address", nodes.dashboard, env=nodes.env)
        assert logs.returncode == 0 and "ppo: RM score" in logs.stdout
        _cli(
            "submit",
            "configs/tiny.yaml",
            *_ppo_only(demo, tmp_path / "stopped", iterations=50, short_eval=short_eval),
            "--address",
            nodes.dashboard,
            "--job-id",
            "stop-me",
            env=nodes.env,
        )
        stopped = _cli("stop", "stop-me", "--address", nodes.dashboard, env=nodes.env)
        assert stopped.returncode == 0 and "stop-me: stopping" in stopped.stdout
        follow = _cli("logs", "stop-me", "--follow", "--address", nodes.dashboard, env=nodes.env)
        assert "job stop-me: STOPPED" in follow.stdout

        # the W&B key reached the job, but neither it nor the cluster's token is in a file of the
        # run (its config, checkpoints, W&B folder), a log or a listing
        for secret in (key, nodes.token):
            for text in (submitted.stdout, submitted.stderr, jobs.stdout, logs.stdout):
                assert secret not in text
            assert _files_containing(run_dir, secret) == []
        assert nodes.processes()
    # the test's cluster is gone, every process of it (the autoscaler's nodes too), and the
    # session's cluster still works
    assert nodes.processes() == []
    assert ray.get(ray.remote(lambda: 41 + 1).remote(), timeout=60) == 42


def _fake_autoscaler(gcs_address: str, head: dict, workers: dict) -> dict:
    """A cluster config for Ray's fake multi-node provider (what `AutoscalingCluster` writes;
    that class itself runs `ray stop --force`, which would end every Ray cluster on the machine,
    and reads an example.yaml that the 2.60 wheel lacks)."""
    return {
        "cluster_name": "fake-multinode",
        "max_workers": sum(t["max_workers"] for t in workers.values()),
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            **workers,
            "ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "auth": {"ssh_user": "ubuntu"},
    }
