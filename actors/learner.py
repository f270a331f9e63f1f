"""The learner: N ranked Ray actors that together host one DeepSpeed ZeRO engine.

The learner knows models and DeepSpeed, not RL: the driver hands it an *objective*, a picklable
function `objective(model, batch) -> (loss, metrics)`, and a batch slice per rank. By convention
the objective's loss is this rank's share of the global batch's loss (its sum divided by the
global count), and its metrics are shares too, so the driver adds them over ranks. DeepSpeed
averages gradients over ranks, so the learner scales the loss by the world size before backward:
N ranks then take exactly the step that one rank takes on the whole batch.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from actors.busy import BusyClock
from actors.threads import thread_env
from cluster import ActorGroup
from cluster.groups import split_evenly

Objective = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, float]]]


@dataclass(frozen=True)
class ModelSpec:
    """Which model a learner group trains."""

    path: str
    """Hugging Face folder (weights as safetensors, with its tokenizer)"""
    kind: str = "causal_lm"
    """"causal_lm" (policy, SFT) or "reward" (a sequence classifier with one output)"""
    trust_remote_code: bool = False
    frozen_layers: int = 0
    """the input embeddings and this many of the lowest transformer blocks are not trained"""


@dataclass(frozen=True)
class OptimSpec:
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0
    total_steps: int = 1
    grad_clip: float = 0.0
    fused: bool = True


@dataclass(frozen=True)
class EngineSpec:
    zero_stage: int = 2
    backend: str = "gloo"
    dtype: str = "float32"
    torch_threads: int = 1
    seed: int = 0
    collective_timeout_s: float = 600.0
    micro_batch: int = 1
    bucket_elements: int = 2**24
    """ZeRO's gradient reduce and all-gather buckets (elements): DeepSpeed's default of 5e8
    holds a 2 GB fp32 buffer on every rank, more than a 135M model's gradients"""
    extra: dict[str, Any] = field(default_factory=dict)


def _skip_muon_import() -> None:
    """DeepSpeed's ZeRO optimizer check (ZeRO-1 and 2; ZeRO-3 imports it for a check of its own)
    imports its Muon optimizer to add it to the supported list, and that module calls
    `torch.compile` at import, which loads torch's inductor: building a ZeRO-2 rank took 1.45
    CPU-seconds with it and 0.5 without (2026-12-03), at every start, for an optimizer we never
    build. Our optimizer is AdamW, which the check finds in the list without that import."""
    engine = importlib.import_module("deepspeed.runtime.engine")
    utils = importlib.import_module("deepspeed.runtime.zero.utils")

    def supported(optimizer: Any) -> bool:
        return type(optimizer) in utils.ZERO_SUPPORTED_OPTIMIZERS

    engine.is_zero_supported_optimizer = supported


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _lr_lambda(opt: OptimSpec) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_lr_ratio (a factor of the peak lr)."""

    def f(step: int) -> float:
        if opt.warmup_steps and step < opt.warmup_steps:
            return (step + 1) / opt.warmup_steps
        span = max(1, opt.total_steps - opt.warmup_steps)
        progress = min(1.0, (step - opt.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return opt.min_lr_ratio + (1.0 - opt.min_lr_ratio) * cosine

    return f


class Learner(BusyClock):
    """One rank. Create through `LearnerGroup`, which wires the ranks together."""

    def __init__(self, rank: int, world_size: int, torch_threads: int = 1) -> None:
        import torch

        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(torch_threads)
        self.engine: Any = None
        self.spec: ModelSpec | None = None

    # -- set-up ------------------------------------------------------------------------------

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def init_distributed(self, master: tuple[str, int], engine: EngineSpec) -> None:
        import torch

        os.environ.update(
            MASTER_ADDR=master[0],
            MASTER_PORT=str(master[1]),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # each rank sees only its own device(s), if any
        )
        if engine.backend == "gloo" and not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # On the CPU, init_distributed compiles a shared-memory op (about 90 s) that training
        # does not need; skip it (patch the module that DeepSpeed itself imports).
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        _skip_muon_import()
        import deepspeed

        deepspeed.init_distributed(
            dist_backend=engine.backend,
            auto_mpi_discovery=False,
            timeout=timedelta(seconds=engine.collective_timeout_s),
            rank=self.rank,
            world_size=self.world_size,
            verbose=False,
        )
        self.engine_spec = engine
        # One rank has nothing to shard: ZeRO-2's bookkeeping would only cost time (a fifth of
        # a policy update on the standard benchmark), and stage 0 computes the same update (a
        # test checks it against two ZeRO-2 ranks). ZeRO-3's update differs from stage 0's in
        # the last digits, so a one-rank ZeRO-3 group stays ZeRO-3.
        one_rank_stage2 = self.world_size == 1 and engine.zero_stage == 2
        self.zero_stage = 0 if one_rank_stage2 else engine.zero_stage

    def build(self, spec: ModelSpec, optim: OptimSpec) -> int:
        """Load the model and wrap it in a ZeRO engine; returns its parameter count."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        from actors.models import freeze_bottom, load_reward_model

        e = self.engine_spec
        torch.manual_seed(e.seed)  # a new head (the RM's) starts the same on every rank
        dtype = torch.bfloat16 if e.dtype == "bfloat16" else torch.float32
        common = {
            "dtype": dtype,
            "use_safetensors": True,
            "trust_remote_code": spec.trust_remote_code,
        }
        if spec.kind == "reward":
            model = load_reward_model(
                spec.path, dtype=dtype, trust_remote_code=spec.trust_remote_code
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.path, **common)
        if torch.cuda.is_available():
            model = model.to(f"cuda:{torch.cuda.current_device()}")
        freeze_bottom(model, spec.frozen_layers)
        trained = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in trained if p.ndim >= 2]
        no_decay = [p for p in trained if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": optim.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=optim.lr,
            betas=optim.betas,
            # not fused: no kernel named, so torch keeps its own default (foreach on a GPU)
            **({"fused": True} if optim.fused else {}),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(optim))
        config = {
            "train_micro_batch_size_per_gpu": e.micro_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {
                "stage": self.zero_stage,
                "reduce_bucket_size": e.bucket_elements,
                "allgather_bucket_size": e.bucket_elements,
            },
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": optim.grad_clip,
            "bf16": {"enabled": e.dtype == "bfloat16"},
            "steps_per_print": 10**12,
            "wall_clock_breakdown": False,
            **e.extra,
        }
        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.spec = spec
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())

    # -- work --------------------------------------------------------------------------------

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        device = self.engine.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _all_finite(self, loss: Any) -> bool:
        """Whether the loss is finite on every rank (collective: all ranks skip together, or a
        step that some took and others not would leave their shards apart)."""
        import torch
        import torch.distributed as dist

        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
        bad = bad.to(loss.device)
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return float(bad.item()) == 0.0

    def train_step(self, batch: dict[str, Any], objective: Objective) -> dict[str, float]:
        """One optimizer step on this rank's slice; returns this rank's metric shares. A loss
        that is not finite on some rank skips the step on all ranks (weights, optimizer and
        schedule stay as they were); rank 0 then reports `skipped: 1`."""
        self.engine.train()
        loss, metrics = objective(self.engine, self._to_device(batch))
        if not self._all_finite(loss):
            metrics = dict(metrics)
            if self.rank == 0:
                metrics["skipped"] = 1.0
            return metrics
        # DeepSpeed averages gradients over ranks; the loss is already a share of the global
        # batch's loss, so scale it back up to make the average equal the global gradient.
        self.engine.backward(loss * self.world_size)
        self.engine.step()
        metrics = dict(metrics)
        if self.rank == 0:
            metrics["lr"] = float(self.engine.get_lr()[0])
            norm = self.engine.get_global_grad_norm()
            if norm is not None:
                metrics["grad_norm"] = float(norm)
        return metrics

    def forward(self, batch: dict[str, Any], fn: Callable[[Any, dict[str, Any]], Any]) -> Any:
        """`fn(model, batch)` without gradients (evaluation, scoring); its result comes back."""
        import torch

        self.engine.eval()
        with torch.no_grad():
            out = fn(self.engine, self._to_device(batch))
        return _to_cpu(out)

    def train_on(
        self,
        sources: list[Any],
        plan: list[Any],
        objective: Objective,
        make_batch: Callable[[list[Any], Any, int, int], dict[str, Any]],
    ) -> list[dict[str, float]]:
        """Several steps in one call. `sources` are object refs that this rank fetches itself
        (the data never passes through the driver); for each entry of `plan`,
        `make_batch(data, entry, rank, world_size)` cuts this rank's batch and the step runs."""
        import ray

        data = ray.get(sources)
        return [
            self.train_step(make_batch(data, entry, self.rank, self.world_size), objective)
            for entry in plan
        ]

    def forward_slice(self, items: list[Any], fn: Callable[[Any, list[Any]], Any]) -> Any:
        """`fn(model, my_share)` without gradients over this rank's share of `items` (every
        rank takes part: ZeRO-3's forward pass is collective)."""
        import torch

        share = split_evenly(items, self.world_size)[self.rank]
        self.engine.eval()
        with torch.no_grad(), self.busy():
            return _to_cpu(fn(self.engine, share))

    # -- weights -----------------------------------------------------------------------------

    def _gathered(self) -> Any:
        """Context in which every parameter is whole (ZeRO-3 gathers them; collective)."""
        import contextlib

        import deepspeed

        if self.zero_stage == 3:
            return deepspeed.zero.GatheredParameters(
                list(self.engine.module.parameters()), modifier_rank=None
            )
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any] | None:
        """The full weights on rank 0 (CPU tensors), None on the others. Collective. Where the
        rank holds them whole on the CPU they are its parameters themselves, not a copy (538 MB
        and 0.4 s on SmolLM2): read them before the next step (a save, `ray.put`, a return
        value all copy them); ZeRO-3's gathered weights are copied before they are released."""
        with self._gathered():
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}
            return {k: v.clone() for k, v in state.items()} if self.zero_stage == 3 else state

    def full_weights(self) -> dict[str, Any]:
        """The full weights on every rank, for a part of the same process (the colocated
        engine): no copy where the rank holds them whole, a gathered copy under ZeRO-3
        (collective)."""
        with self._gathered():
            state = self.engine.module.state_dict()
            if self.zero_stage == 3:
                return {k: v.detach().clone() for k, v in state.items()}
            return {k: v.detach() for k, v in state.items()}

    def save_checkpoint(self, folder: str) -> None:
        """Weights, optimizer and schedule of every rank into `folder` (DeepSpeed's layout).
        Collective."""
        self.engine.save_checkpoint(folder, tag="state")

    def load_checkpoint(self, folder: str) -> None:
        """Back to the state that `save_checkpoint` wrote. Collective. The files are read
        without running code from them (see `_safe_torch_load`)."""
        self.engine.checkpoint_engine.load = _safe_torch_load
        path, _ = self.engine.load_checkpoint(folder, tag="state")
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint (tag 'state')")

    def publish_weights(self) -> Any:
        """Put the full weights in the object store; rank 0 returns the ref, the others None.
        Collective. The engines fetch the weights from the store, not through the driver."""
        import ray

        state = self.state_dict()
        return None if state is None else ray.put(state)

    def join_weight_group(
        self, address: tuple[str, int], world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Rank 0: join the broadcast sync group as its sender (collective with the engines)."""
        from actors.weightsync import WeightGroup

        self.weight_group = WeightGroup(address, 0, world_size, backend, timeout_s)

    def weight_layout(self) -> list[Any] | None:
        """Rank 0: names, shapes and dtypes of the full weights (what the engines receive
        into); None on the others. Collective."""
        from actors.weightsync import layout

        state = self.state_dict()
        return None if state is None else layout(state)

    def broadcast_weights(self, bucket_bytes: int) -> int:
        """Every rank (ZeRO-3 gathers collectively); rank 0 broadcasts the full weights to the
        engines of its sync group. Returns the bytes sent (0 on the other ranks)."""
        with self._gathered():
            if self.rank != 0:
                return 0
            state = {k: v.detach() for k, v in self.engine.module.state_dict().items()}
            return int(self.weight_group.send(state, bucket_bytes))

    def save(self, path: str, config_updates: dict[str, Any] | None = None) -> None:
        """Write a Hugging Face folder (safetensors + tokenizer) at `path`. Collective.

        Rank 0 writes into `path`.tmp and renames it, so `path` is either the old folder or
        the whole new one.
        """
        from transformers import AutoTokenizer

        state = self.state_dict()
        if self.rank != 0:
            return
        assert self.spec is not None and state is not None
        module = self.engine.module
        for key, value in (config_updates or {}).items():
            setattr(module.config, key, value)
        target, tmp = Path(path), Path(path + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(
            self.spec.path, trust_remote_code=self.spec.trust_remote_code
        ).save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)


def _safe_torch_load(path: str, map_location: Any = None) -> Any:
    """DeepSpeed's checkpoint reader, without pickle's code execution: torch's `weights_only`
    loader (tensors and plain containers), allowing only the three plain DeepSpeed classes that
    its checkpoints hold. DeepSpeed's own reader passes weights_only=False: a checkpoint folder
    from elsewhere could run code on `--resume`."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _to_cpu(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, dict):
        return {k: _to_cpu(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_cpu(v) for v in out)
    return out


START_DEADLINE_S = 300.0
"""The least time a learner rank gets to start, connect and build (see `finish_build`)."""


class LearnerGroup:
    """N learner ranks, placed together (PACK), hosting one ZeRO engine.

    The constructor waits only for the placement: the ranks start, and connect to each other,
    while the caller starts other groups; `build` (or `submit_build`) waits for them."""

    def __init__(
        self,
        *,
        name: str,
        ranks: int,
        engine: EngineSpec,
        cpus_per_rank: float = 1.0,
        gpus_per_rank: float = 0.0,
        memory_gb_per_rank: float = 0.0,
        resources_per_rank: dict[str, float] | None = None,
        placement_timeout_s: float = 120.0,
        autoscaling_timeout_s: float | None = None,
        call_timeout_s: float = 600.0,
        log: Callable[[str], None] = print,
        group: ActorGroup | None = None,
    ) -> None:
        """`group`: the ranks as parts of a colocated placement's hosts (a `PartGroup` of
        `Learner`) instead of actors of their own."""
        self.name = name
        self.parameters = 0  # the model's, once built
        self.group = group or ActorGroup(
            Learner,
            ranks,
            name=name,
            num_cpus=cpus_per_rank,
            num_gpus=gpus_per_rank,
            memory_gb=memory_gb_per_rank,
            resources=resources_per_rank,
            strategy="PACK",
            placement_timeout_s=placement_timeout_s,
            autoscaling_timeout_s=autoscaling_timeout_s,
            call_timeout_s=call_timeout_s,
            log=log,
            actor_kwargs={"torch_threads": engine.torch_threads},
            env_vars=thread_env(engine.torch_threads),
        )
        # each rank connects as soon as it has started; its later calls queue behind this one
        master = self.group.actors[0].address.remote()
        self._connecting: list[Any] = self.group.submit("init_distributed", master, engine)

    @property
    def ranks(self) -> int:
        return self.group.n

    def submit_build(self, spec: ModelSpec, optim: OptimSpec) -> list[Any]:
        """Start loading the model into the ZeRO engine on every rank (once they have started
        and connected); `finish_build` waits for it. Groups built at once start in parallel."""
        return self.group.submit("build", spec, optim)

    def finish_build(self, refs: list[Any]) -> int:
        """Wait for `submit_build`; the model's parameter count. A rank that failed to start,
        connect or build shuts the group down and raises a RemoteCallError naming it.

        Starting is not a collective: a rank's process starts, imports DeepSpeed and loads the
        model while the other roles start beside it, which on a busy 2-core machine takes longer
        than a short collective deadline. The start waits for the longer of the two deadlines."""
        call = self.group.call_timeout_s
        start = None if call is None else max(call, START_DEADLINE_S)
        try:
            if self._connecting:
                self.group.get(self._connecting, "init_distributed", timeout_s=start)
                self._connecting = []
            self.parameters = int(self.group.get(refs, "build", timeout_s=start)[0])
            return self.parameters
        except BaseException:
            self.group.shutdown()
            raise

    def build(self, spec: ModelSpec, optim: OptimSpec) -> int:
        return self.finish_build(self.submit_build(spec, optim))

    def train_step(self, objective: Objective, shards: list[dict[str, Any]]) -> dict[str, float]:
        """One step over the global batch given as one slice per rank; metrics summed over
        ranks (they are shares), rank 0's extras (lr, grad_norm) as they are."""
        per_rank = self.group.call_each("train_step", shards, objective=objective)
        return self.sum_shares([[m] for m in per_rank])[0]

    def forward(self, fn: Callable[[Any, dict[str, Any]], Any], shards: list[Any]) -> list[Any]:
        return self.group.call_each("forward", shards, fn=fn)

    def state_dict(self) -> dict[str, Any]:
        return self.group.call("state_dict")[0]

    def submit_forward_slice(
        self, items_ref: Any, fn: Callable[[Any, list[Any]], Any]
    ) -> list[Any]:
        """Start `fn` on every rank's share of the items behind `items_ref`; the refs of the
        per-rank results, in rank order."""
        return self.group.submit("forward_slice", items_ref, fn=fn)

    def submit_train_on(
        self,
        sources: list[Any],
        plan: list[Any],
        objective: Objective,
        make_batch: Callable[..., dict[str, Any]],
    ) -> list[Any]:
        return self.group.submit(
            "train_on", sources, plan, objective=objective, make_batch=make_batch
        )

    @staticmethod
    def sum_shares(per_rank: list[list[dict[str, float]]]) -> list[dict[str, float]]:
        """Per step, the metrics of all ranks added (they are shares of the global value)."""
        steps: list[dict[str, float]] = []
        for step_metrics in zip(*per_rank, strict=True):
            total: dict[str, float] = {}
            for metrics in step_metrics:
                for key, value in metrics.items():
                    total[key] = total.get(key, 0.0) + value
            steps.append(total)
        return steps

    def save_checkpoint(self, folder: str | Path) -> None:
        self.group.call("save_checkpoint", str(folder))

    def load_checkpoint(self, folder: str | Path) -> None:
        self.group.call("load_checkpoint", str(folder))

    def publish_weights(self) -> Any:
        """An object ref to the full weights (a Hugging Face state dict)."""
        return next(ref for ref in self.group.call("publish_weights") if ref is not None)

    def open_weight_group(self, engines: ActorGroup, backend: str, timeout_s: float) -> None:
        """Form the broadcast sync group of rank 0 and every engine of `engines`."""
        import ray

        sender = self.group.actors[0]
        address = ray.get(sender.address.remote(), timeout=timeout_s)  # a free port on its node
        world = engines.n + 1
        joins = [sender.join_weight_group.remote(address, world, backend, timeout_s)]
        joins += [a.join_weight_group.remote(address, world, backend, timeout_s)
                  for a in engines.actors]  # fmt: skip
        # the engines first: one that died ends the wait at once, while the sender would wait
        # for it until its deadline
        engines.get(joins[1:], "join_weight_group")
        self.group.get(joins[:1], "join_weight_group")
        self.weight_layout = self.group.call("weight_layout")[0]
        self.weight_members = [a._actor_id for a in engines.actors]
        self.weight_backend, self.weight_timeout_s = backend, timeout_s

    def submit_broadcast(
        self, engines: ActorGroup, version: int, bucket_bytes: int
    ) -> tuple[list[Any], list[Any]]:
        """Start a broadcast sync of the weights to `engines`, as `version`: (the policy's refs,
        the engines' refs). An engine replaced since the group formed makes it form again."""
        if [a._actor_id for a in engines.actors] != self.weight_members:
            self.open_weight_group(engines, self.weight_backend, self.weight_timeout_s)
        sending = self.group.submit("broadcast_weights", bucket_bytes)
        receiving = engines.submit("receive_weights", self.weight_layout, bucket_bytes, version)
        return sending, receiving

    def save(self, path: str | Path, config_updates: dict[str, Any] | None = None) -> None:
        self.group.call("save", str(path), config_updates)

    def peak_memory_gb(self) -> float:
        """The largest peak resident memory of the ranks (GB)."""
        return max(m["rss_gb"] for m in self.group.call("peak_memory_gb"))

    def shutdown(self) -> None:
        self.group.shutdown()

    def __enter__(self) -> LearnerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


__all__ = ["EngineSpec", "Learner", "LearnerGroup", "ModelSpec", "OptimSpec", "split_evenly"]
