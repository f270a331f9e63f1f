"""The built-in task: "Write a short review of the {topic}".

Everything is generated from a seed and written to disk as ordinary files that a user could
replace with their own:

    task/sft_train.jsonl, sft_heldout.jsonl   demonstrations   {"prompt", "response"}
    task/rm_train.jsonl, rm_heldout.jsonl     comparisons      {"prompt", "responses": best first}
    task/prompts_train.jsonl, prompts_heldout.jsonl            {"prompt"}
    task/base_model/                          tiny random-init causal LM + word-level tokenizer
    task/task.json                            the settings and the measured labeler agreement

The hidden labeler stands in for InstructGPT's human labelers: VADER's compound sentiment score of
the response, minus penalties for an off-topic, malformed or repetitive one. Demonstrations are
mostly neutral or negative (so SFT imitates a mediocre writer); comparisons are ranked by the
labeler through Plackett–Luce noise whose temperature is calibrated so that the labels agree with
the noiseless labeler on about `labeler_agreement` of the pairs (Bradley–Terry marginals).

Held-out prompts use (qualifier, topic) combinations that never occur in training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from trainers.label_noise import (
    calibrate_temperature as calibrate_temperature,
)
from trainers.label_noise import (
    expected_agreement as expected_agreement,
)
from trainers.label_noise import (
    noisy_ranking as noisy_ranking,
)
from trainers.label_noise import (
    pairwise_agreement as pairwise_agreement,
)
from trainers.tiny_model import build_model as build_model

TOPICS = (
    "movie", "book", "restaurant", "phone", "laptop", "hotel", "album", "game", "camera", "bike",
    "car", "show", "concert", "museum", "park", "cafe", "jacket", "watch", "tablet", "printer",
    "headphones", "course", "podcast", "blender", "tent", "backpack", "chair", "lamp", "keyboard",
    "guitar",
)  # fmt: skip
QUALIFIERS = ("new", "local", "old", "cheap", "popular", "small")
ASPECTS = ("price", "quality", "design", "value", "look", "feel", "size", "service", "finish")
ADVERBS = ("very", "really", "quite", "rather", "truly")
ADJECTIVES = {
    "positive": ("great", "excellent", "wonderful", "amazing", "good", "lovely", "fantastic",
                 "superb", "delightful", "nice"),
    "neutral": ("okay", "average", "ordinary", "plain", "standard", "usual", "normal", "typical",
                "simple", "modest"),
    "negative": ("bad", "terrible", "awful", "poor", "disappointing", "boring", "horrible",
                 "weak", "dull", "annoying"),
}  # fmt: skip
VERDICTS = {
    "positive": ("i would recommend it .", "i would buy it again .", "i loved it ."),
    "neutral": ("it was fine i guess .", "i have no strong feelings about it .",
                "it is what it is ."),
    "negative": ("i would not recommend it .", "i would not buy it again .", "i regret it ."),
}  # fmt: skip
SENTIMENTS = ("positive", "neutral", "negative")
# Demonstrations: mostly neutral or negative, so the SFT policy is mediocre under the labeler.
DEMO_SENTIMENT_WEIGHTS = (0.15, 0.45, 0.40)
PROMPT_TEMPLATE = "write a short review of the {qualifier} {topic} ."
PROMPT_RE = re.compile(r"^write a short review of the (?:(\w+) )?(\w+) \.$")

# Special tokens of the chat template.
PAD, UNK, EOS, USER, ASSISTANT = "<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% elif m['role'] == 'assistant' %}<|assistant|> {{ m['content'] }} <eos>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Labeler penalties (in units of VADER's compound score, which lies in [-1, 1]).
OFF_TOPIC_PENALTY = 1.0
MALFORMED_PENALTY = 1.0
REPETITION_PENALTY = 2.0  # times the fraction of repeated word trigrams
MIN_WORDS, MAX_WORDS = 5, 50


# ---------------------------------------------------------------------------------------------
# the hidden labeler


@lru_cache(maxsize=1)
def _vader() -> Any:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def prompt_topic(prompt: str) -> str | None:
    m = PROMPT_RE.match(prompt.strip().lower())
    return m.group(2) if m else None


def _words(text: str) -> list[str]:
    return re.findall(r"<[^>\s]+>|[\w']+|[^\w\s]", text.lower())


def labeler_breakdown(prompt: str, response: str) -> dict[str, float]:
    """The hidden labeler's score of a response, with its parts."""
    words = _words(response)
    topic = prompt_topic(prompt)
    content = [w for w in words if w.isalnum()]
    sentiment = _vader().polarity_scores(" ".join(words))["compound"] if words else 0.0
    off_topic = topic is not None and (
        topic not in content or any(t in content for t in TOPICS if t != topic)
    )
    adjectives = {a for group in ADJECTIVES.values() for a in group}
    run = best = 0
    for w in words:  # a "word salad" of three sentiment adjectives in a row is malformed
        run = run + 1 if w in adjectives else 0
        best = max(best, run)
    malformed = (
        not MIN_WORDS <= len(content) <= MAX_WORDS
        or not words
        or words[-1] not in (".", "!")
        or any(w.startswith("<") for w in words)
        or best >= 3
    )
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    repetition = 1.0 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    score = (
        sentiment
        - OFF_TOPIC_PENALTY * off_topic
        - MALFORMED_PENALTY * malformed
        - REPETITION_PENALTY * repetition
    )
    return {
        "score": score,
        "sentiment": sentiment,
        "off_topic": float(off_topic),
        "malformed": float(malformed),
        "repetition": repetition,
    }


def labeler_score(prompt: str, response: str) -> float:
    """The hidden labeler: higher is better."""
    return labeler_breakdown(prompt, response)["score"]


# ---------------------------------------------------------------------------------------------
# the generator


def _sentence(rng: random.Random, topic: str, sentiment: str) -> str:
    adj = rng.choice(ADJECTIVES[sentiment])
    adv = rng.choice(ADVERBS)
    aspect = rng.choice(ASPECTS)
    forms = (
        f"the {topic} is {adv} {adj} .",
        f"this {topic} was {adj} .",
        f"the {aspect} is {adj} .",
        f"the {aspect} of the {topic} is {adv} {adj} .",
        f"i found the {aspect} {adj} .",
    )
    return rng.choice(forms)


def write_response(rng: random.Random, topic: str, sentiment: str) -> str:
    """A clean response of 2-4 sentences with one overall sentiment (one sentence may differ)."""
    n = rng.randint(2, 4)
    sentences = [f"i tried the {topic} ."] if rng.random() < 0.3 else []
    for _ in range(n - 1):
        s = sentiment if rng.random() < 0.8 else rng.choice(SENTIMENTS)
        sentences.append(_sentence(rng, topic, s))
    sentences.append(rng.choice(VERDICTS[sentiment]))
    return " ".join(sentences)


def corrupt(rng: random.Random, response: str, topic: str) -> str:
    """A flawed variant for comparisons: off-topic, repetitive or malformed."""
    kind = rng.choice(("off_topic", "repetitive", "malformed"))
    if kind == "off_topic":
        other = rng.choice([t for t in TOPICS if t != topic])
        return response.replace(topic, other)
    sentences = [s.strip() + " ." for s in response.split(" .") if s.strip()]
    if kind == "repetitive":
        s = rng.choice(sentences)
        return " ".join([*sentences, *([s] * rng.randint(2, 3))])
    words = response.split()
    return " ".join(words[: rng.randint(1, max(1, len(words) - 2))])  # cut short, no full stop


@dataclass(frozen=True)
class _Prompt:
    prompt: str
    topic: str


def _prompts(rng: random.Random, n_train: int, n_heldout: int) -> tuple[list[_Prompt], ...]:
    combos = [(q, t) for q in QUALIFIERS for t in TOPICS]
    rng.shuffle(combos)
    cut = len(combos) // 5  # a fifth of the (qualifier, topic) pairs is held out
    held, train = combos[:cut], combos[cut:]

    def draw(pool: list[tuple[str, str]], n: int) -> list[_Prompt]:
        picks = [rng.choice(pool) for _ in range(n)]
        return [_Prompt(PROMPT_TEMPLATE.format(qualifier=q, topic=t), t) for q, t in picks]

    return draw(train, n_train), draw(held, n_heldout)


def _candidates(rng: random.Random, p: _Prompt, k: int) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        r = write_response(rng, p.topic, rng.choice(SENTIMENTS))
        if rng.random() < 0.3:
            r = corrupt(rng, r, p.topic)
        if r not in out:  # K distinct responses
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer and model


def build_tokenizer(texts: list[str]) -> Any:
    """A word-level tokenizer over the task's own vocabulary, with the chat template."""
    words = {w for text in texts for w in _words(text)}
    words |= {w for group in ADJECTIVES.values() for w in group}
    words |= set(TOPICS) | set(QUALIFIERS) | set(ASPECTS) | set(ADVERBS)
    return word_level_tokenizer(sorted(words - set(SPECIALS)))


SPECIALS = (PAD, UNK, EOS, USER, ASSISTANT)


def word_level_tokenizer(words: list[str]) -> Any:
    """A lowercase, whitespace-split word-level tokenizer: the special tokens, then `words` in
    their order, with the chat template (the built-in tasks' tokenizer)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="right",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------------------------------------
# writing the task


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def task_manifest(cfg: Any) -> dict[str, Any]:
    """What the task folder was built from (cfg: TaskConfig; the review task's settings are
    written without the kind, as before there were two)."""
    settings = cfg.model_dump(mode="json")
    if settings.get("kind") == "reviews":
        del settings["kind"]
    return {"format": 1, "settings": settings}


def task_labeler(cfg: Any) -> Any:
    """The task's hidden labeler, (prompt, response) -> score (cfg: TaskConfig)."""
    if cfg.kind == "arithmetic":
        from trainers.arithmetic import arithmetic_labeler

        return arithmetic_labeler
    return labeler_score


def build_task(cfg: Any, folder: Path) -> dict[str, Any]:
    """Generate the task's files into `folder` (cfg: TaskConfig); returns task.json's contents.

    The manifest is written last, so a folder without it is an unfinished build.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    train, held = _prompts(rng, cfg.train_prompts, cfg.heldout_prompts)

    def demos(ps: list[_Prompt]) -> list[dict[str, str]]:
        return [
            {"prompt": p.prompt, "response": write_response(rng, p.topic, s)}
            for p in ps
            for s in rng.choices(SENTIMENTS, weights=DEMO_SENTIMENT_WEIGHTS)
        ]

    sft_train, sft_held = demos(train), demos(held)
    cands = {
        split: [_candidates(rng, p, rng.randint(cfg.min_ranked, cfg.max_ranked)) for p in ps]
        for split, ps in (("train", train), ("heldout", held))
    }
    prompts = {"train": train, "heldout": held}
    scores = {
        split: [
            [labeler_score(p.prompt, r) for r in rs]
            for p, rs in zip(prompts[split], c, strict=True)
        ]
        for split, c in cands.items()
    }
    temperature = calibrate_temperature(scores["train"], cfg.labeler_agreement)
    measured: dict[str, float] = {}
    for split in ("train", "heldout"):
        rows, in_label_order = [], []
        for p, rs, ss in zip(prompts[split], cands[split], scores[split], strict=True):
            order = noisy_ranking(rng, ss, temperature)
            rows.append({"prompt": p.prompt, "responses": [rs[i] for i in order]})
            in_label_order.append([ss[i] for i in order])
        _write_jsonl(folder / f"rm_{split}.jsonl", rows)
        measured[split] = pairwise_agreement(in_label_order)
    _write_jsonl(folder / "sft_train.jsonl", sft_train)
    _write_jsonl(folder / "sft_heldout.jsonl", sft_held)
    for split, ps in prompts.items():
        _write_jsonl(folder / f"prompts_{split}.jsonl", [{"prompt": p.prompt} for p in ps])

    all_text = [r["prompt"] + " " + r["response"] for r in sft_train + sft_held]
    all_text += [r for c in cands.values() for rs in c for r in rs]
    tokenizer = build_tokenizer(all_text)
    model = build_model(cfg.model, tokenizer, cfg.seed)
    model.save_pretrained(folder / "base_model", safe_serialization=True)
    tokenizer.save_pretrained(folder / "base_model")

    manifest = {
        **task_manifest(cfg),
        "noise_temperature": temperature,
        "labeler_agreement_train": measured["train"],
        "labeler_agreement_heldout": measured["heldout"],
        "counts": {
            "sft_train": len(sft_train),
            "sft_heldout": len(sft_held),
            "rm_train": len(cands["train"]),
            "rm_heldout": len(cands["heldout"]),
            "vocab": len(tokenizer),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
    }
    (folder / "task.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure_task(cfg: Any, folder: Path, log: Any = print) -> dict[str, Any]:
    """Build the task into `folder` unless it is there, built from the same settings."""
    manifest_path = folder / "task.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == task_manifest(cfg)["settings"]:
            log(f"task: using {folder}")
            return dict(manifest)
        raise FileExistsError(
            f"{folder} holds a task built with other settings than the config's `task` section; "
            "remove the folder or choose another output_dir"
        )
    log(f"task: building the built-in {cfg.kind} task into {folder}")
    if cfg.kind == "arithmetic":
        from trainers.arithmetic import build_arithmetic_task

        return build_arithmetic_task(cfg, folder)
    return build_task(cfg, folder)
