"""The RL stage's evaluation: the policy's responses to the held-out prompts judged by the RM, the
KL to the reference and (on a built-in task) the hidden labeler; the alignment tax; the samples
table and the file of both policies' responses side by side."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray

from trainers.config import RunConfig
from trainers.experience import weighted_sum
from trainers.rl.inputs import RLInputs
from trainers.rl.roles import Roles
from trainers.rl.rollout import chunked, generate, prompt_record, sampling_of
from trainers.sft import demonstration_loss


def sample_policy(
    roles: Roles, inputs: RLInputs, config: RunConfig, labeler: Any, trained: bool = True
) -> dict[str, Any]:
    """One response per held-out prompt from the engines' current weights, judged: the reward
    (the RM's score, or its sources' weighted sum), the KL to the reference (nats per sequence)
    and, on a built-in task, the hidden labeler. Before training (`trained` false) the engines
    hold the reference's own weights: the KL is 0 by definition and the reference's forward
    passes (a third of the evaluation's work on a real model) are not made."""
    sampling = sampling_of(config.ppo, training=False)
    # A prompt gets the same seed before and after training: its two responses differ only by
    # the policy (common random numbers).
    seed = config.seed * 1_000_003
    size = config.chunk_size(len(inputs.heldout_prompts))
    chunks = chunked([p["prompt_ids"] for p in inputs.heldout_prompts], size)
    records = chunked([prompt_record(p) for p in inputs.heldout_prompts], size)
    refs = generate(roles, chunks, sampling, seed)
    order = sorted(refs, key=refs.__getitem__)
    # A chunk is scored and given its reference log-probs as soon as it is generated (Ray starts
    # a call when its argument is ready): the engines, the reward and the reference work at once.
    engines, references = roles.engines.n, roles.reference.actors
    scored = [roles.score(ref, records[i], i % engines) for i, ref in enumerate(order)]
    ref_lps = (
        [
            references[(i % engines) % len(references)].logprobs.remote(ref, sampling.temperature)
            for i, ref in enumerate(order)
        ]
        if trained
        else []
    )
    timeout = config.learner.collective_timeout_s
    samples = [s for chunk in ray.get(order, timeout=timeout) for s in chunk]
    per_chunk = [ray.get(parts, timeout=timeout) for parts in scored]
    parts = [[x for chunk in per_chunk for x in chunk[k]] for k in range(len(roles.rewards))]
    scores = weighted_sum(parts, roles.score_weights)
    tok = inputs.tokenizer
    texts = [tok.decode(s["response_ids"], skip_special_tokens=True) for s in samples]
    kls = [0.0] * len(samples)
    if trained:
        ref_lp = [lp for chunk in ray.get(ref_lps, timeout=timeout) for lp in chunk]
        kls = [sum(s["logprobs"]) - sum(r) for s, r in zip(samples, ref_lp, strict=True)]
    judged = (
        [labeler(p["text"], t) for p, t in zip(inputs.heldout_prompts, texts, strict=True)]
        if labeler
        else []
    )
    return {"texts": texts, "scores": scores, "kl": kls, "labeler": judged}


def demo_loss(roles: Roles, inputs: RLInputs, batch_size: int) -> float:
    """The policy's NLL per token on held-out demonstrations (the alignment tax's measure)."""
    return demonstration_loss(roles.policy, inputs.heldout_demos, roles.pad_id, batch_size)


def evaluate(
    roles: Roles, inputs: RLInputs, config: RunConfig, labeler: Any, trained: bool = True
) -> tuple[dict[str, Any], float]:
    """`sample_policy` and the alignment tax's `demo_loss` at once: the engines generate and the
    reward scores while the policy's learners, idle otherwise, compute the loss (each part's
    result is what it would be alone). A fault in either is raised once both have ended."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-loss") as pool:
        loss = pool.submit(demo_loss, roles, inputs, config.ppo.minibatch_size)
        sampled = sample_policy(roles, inputs, config, labeler, trained)
        return sampled, loss.result()


def write_eval(path: Path, inputs: RLInputs, before: dict[str, Any], after: dict[str, Any]) -> None:
    """The held-out prompts with the SFT and the PPO policy's responses side by side."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, prompt in enumerate(inputs.heldout_prompts):
            row = {"prompt": prompt["text"]}
            for name, result in (("sft", before), ("ppo", after)):
                row[f"{name}_response"] = result["texts"][i]
                row[f"{name}_rm_score"] = result["scores"][i]
                row[f"{name}_kl"] = result["kl"][i]
                if result["labeler"]:
                    row[f"{name}_labeler_score"] = result["labeler"][i]
            f.write(json.dumps(row) + "\n")


def sample_rows(samples: list[dict[str, Any]], inputs: RLInputs, labeler: Any) -> list[list[Any]]:
    tok = inputs.tokenizer
    rows = []
    for s in samples:
        prompt = tok.decode(s["prompt_ids"], skip_special_tokens=True)
        response = tok.decode(s["response_ids"], skip_special_tokens=True)
        judged = labeler(prompt, response) if labeler else None
        rows.append(
            [
                prompt,
                response,
                s["score"],
                sum(s["logprobs"]) - sum(s["ref_logprobs"]),
                judged,
                s["version"],
            ]
        )
    return rows
