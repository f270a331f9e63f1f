"""Noisy comparison labels: a Plackett–Luce ranking of the labeler's scores at a temperature
calibrated so that the labels agree with the noiseless labeler on a chosen share of pairs
(Bradley–Terry marginals), and that share measured."""

from __future__ import annotations

import math
import random


def expected_agreement(score_sets: list[list[float]], temperature: float) -> float:
    """Expected fraction of pairs that Plackett–Luce labels put in the noiseless order.

    The pairwise marginal of Plackett–Luce with utilities s/τ is Bradley–Terry: P(i above j) =
    σ((s_i − s_j)/τ); a tie counts half, as in the ceiling that the RM stage measures.
    """
    total = n = 0.0
    for scores in score_sets:
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                gap = abs(scores[i] - scores[j]) / temperature
                total += 1.0 / (1.0 + math.exp(-gap)) if gap < 700 else 1.0
                n += 1
    return total / max(n, 1)


def calibrate_temperature(score_sets: list[list[float]], agreement: float) -> float:
    """The noise temperature τ at which the expected agreement equals `agreement` (bisection)."""
    lo, hi = 1e-4, 1e3  # agreement falls as τ grows
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if expected_agreement(score_sets, mid) > agreement:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


def noisy_ranking(rng: random.Random, scores: list[float], temperature: float) -> list[int]:
    """Indices best first, sampled from Plackett–Luce (Gumbel-max) with utilities s/τ."""
    keys = [s / temperature - math.log(-math.log(rng.random() or 1e-300)) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def pairwise_agreement(rankings: list[list[float]]) -> float:
    """Fraction of pairs (i ranked above j) whose noiseless scores agree (ties count half)."""
    agree = n = 0.0
    for scores in rankings:  # each list is the labeler's scores in the noisy (label) order
        for i in range(len(scores)):
            for j in range(i + 1, len(scores)):
                agree += 1.0 if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0.0
                n += 1
    return agree / max(n, 1)
