"""pad = eos (SmolLM2, many chat models): a finished response is scored with its end token, and
padding is never a token of the response or of the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.batching import last_token_scores, pack
from actors.models import load_reward_model
from tests.real_model import tiny_tied_llama
from trainers.data import collate_comparisons
from trainers.objectives import rm_eval, rm_score

pytestmark = pytest.mark.unit

EOS = 2  # also the pad id, as in SmolLM2


@pytest.fixture(scope="module")
def rm(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    folder = tiny_tied_llama(
        tmp_path_factory.mktemp("pad_is_eos"), pad_token_id=EOS, eos_token_id=EOS
    )
    torch.manual_seed(1)
    return load_reward_model(str(folder), dtype=torch.float32).eval()


def _alone(rm: torch.nn.Module, ids: list[int]) -> float:
    """The head at the last token of the unpadded sequence."""
    hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state
    return float(rm.score(hidden)[0, -1, 0])


SAMPLES = [
    {"prompt_ids": [3, 4, 5, 6], "response_ids": [7, 8, EOS]},  # finished: ends with eos
    {"prompt_ids": [9, 10], "response_ids": [11, EOS]},
    {"prompt_ids": [9, 10, 11], "response_ids": [12, 13, 14, 15]},  # cut at max_new_tokens
]


@torch.no_grad()
def test_a_finished_response_is_scored_at_its_end_token(rm: torch.nn.Module) -> None:
    batch = pack(SAMPLES, pad_id=EOS)  # left- and right-padded with the eos id
    got = last_token_scores(rm, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    expect = [_alone(rm, s["prompt_ids"] + s["response_ids"]) for s in SAMPLES]
    assert got.tolist() == pytest.approx(expect, abs=1e-5)
    # transformers' own pooling (the last token that is not the pad id) skips the end token:
    # what the RM would then score is the token before it, another value
    hf = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
    before_eos = _alone(rm, SAMPLES[0]["prompt_ids"] + SAMPLES[0]["response_ids"][:-1])
    assert float(hf[0]) == pytest.approx(before_eos, abs=1e-5)
    assert abs(float(got[0]) - before_eos) > 1e-4


def test_padding_is_never_a_response_token() -> None:
    batch = pack(SAMPLES, pad_id=EOS)
    # the response mask counts each response's own tokens, its eos included, and no padding
    assert batch["response_mask"].sum(dim=1).tolist() == [3, 2, 4]
    assert batch["attention_mask"].sum(dim=1).tolist() == [7, 4, 7]


@torch.no_grad()
def test_the_rm_stage_scores_comparisons_at_their_end_token(rm: torch.nn.Module) -> None:
    """The RM's training and evaluation read the same position as the reward actor does."""
    sequences = [[3, 4, 5, 7, EOS], [3, 4, 5, 8, 9, 10, EOS]]
    batch = collate_comparisons([{"sequences": sequences}], pad_id=EOS, normalizer=1)
    scores = rm_eval(rm, batch)[0].tolist()
    assert scores == pytest.approx([_alone(rm, s) for s in sequences], abs=1e-5)
    rows = pack([{"prompt_ids": [], "response_ids": s} for s in sequences], pad_id=EOS)
    assert rm_score(rm, rows).tolist() == pytest.approx(scores, abs=1e-5)


def test_a_prompt_shared_by_its_responses_is_computed_once_for_the_same_scores_and_gradients(
    rm: torch.nn.Module,
) -> None:
    """The RM's comparisons batch computes each prompt once for its K responses: the scores and
    the gradients are the full pass's over every row, with prompts of different lengths,
    responses of different lengths, a response tokens of which the others share, and a prompt
    that is all but one token of a response."""
    examples = [
        {
            "sequences": [
                [3, 4, 5, 6, 7, EOS],
                [3, 4, 5, 6, 8, 9, 10, EOS],
                [3, 4, 5, 6, 7, 11, EOS],
            ]
        },
        {"sequences": [[12, 13, EOS], [12, 13, 14, 15, EOS]]},
        {"sequences": [[16, 17, 18, 19, 20, 21, 22], [16, 17, 18, 19, 20, 21, 23]]},
    ]
    batch = collate_comparisons(examples, pad_id=EOS, normalizer=3)
    assert batch["prefix_mask"].sum(dim=1).tolist() == [4, 2, 6]
    assert batch["suffix_mask"].sum(dim=1).tolist() == [2, 4, 3, 1, 3, 1, 1]
    params = list(rm.parameters())

    def grads(scores: torch.Tensor) -> list[torch.Tensor]:
        weights = torch.arange(1.0, scores.numel() + 1).reshape(scores.shape)
        return list(torch.autograd.grad((scores.nan_to_num(0.0) * weights).sum(), params))

    with torch.enable_grad():
        shared = rm_eval(rm, batch)
        rows = [s for e in examples for s in e["sequences"]]
        full = last_token_scores(rm, *_right_padded(rows))
        full_ranked = full[batch["index"]].masked_fill(~batch["valid"], float("nan"))
        torch.testing.assert_close(shared, full_ranked, rtol=0, atol=1e-5, equal_nan=True)
        for a, b in zip(grads(shared), grads(full_ranked), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # rows that do not share their first token are not one prompt's: one plain pass
    mixed = [*examples[:1], {"sequences": [[5, EOS], [6, 7, EOS]]}]
    batch = collate_comparisons(mixed, pad_id=EOS, normalizer=2)
    assert batch["prefix_ids"].shape[1] == 0
    rows = [s for e in mixed for s in e["sequences"]]
    with torch.no_grad():
        expect = [_alone(rm, r) for r in rows]
        assert rm_eval(rm, batch)[batch["valid"]].tolist() == pytest.approx(expect, abs=1e-5)


def _right_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [EOS] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def test_a_reward_folder_saved_from_the_rm_keeps_pad_and_eos(rm, tmp_path: Path) -> None:
    rm.save_pretrained(tmp_path / "rm")
    again = load_reward_model(str(tmp_path / "rm"), dtype=torch.float32)
    assert again.config.pad_token_id == EOS
