"""The reward role without a reward model (actors/reward_fn.py): a Python function named
"module:function" or an HTTP endpoint scores the decoded responses in batches.

Unit tests build the class in process, with a tiny tokenizer, against the functions of
tests/reward_fns.py and a real HTTP server on loopback; the integration test runs it as a Ray
actor of an ActorGroup, as the driver does."""

from __future__ import annotations

import itertools
import json
import math
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from actors.reward_fn import RewardFunction, RewardFunctionError
from tests import reward_fns

QUESTION = "what is two plus two"
CHAT = [{"role": "user", "content": "name a colour"}]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainers.task import build_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer([QUESTION, "name a colour", "four five red bad"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


@pytest.fixture(autouse=True)
def _fresh_calls() -> None:
    reward_fns.CALLS.clear()


def _batch(
    tokenizer: Any, rows: list[tuple[Any, str, dict[str, Any]]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Samples as the engine gives them (response ids end with the end token) and their prompt
    records, from (prompt, response text, other fields of the prompt line)."""
    samples, records = [], []
    for prompt, response, fields in rows:
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        samples.append({"prompt_ids": [1, 2, 3], "response_ids": [*ids, tokenizer.eos_token_id]})
        records.append({"prompt": prompt, **fields})
    return samples, records


# three samples: right, wrong (with a conversation for a prompt), and one with no answer
ROWS = [
    (QUESTION, "four", {"answer": "four"}),
    (CHAT, "four", {"answer": "red", "source": "colours"}),
    (QUESTION, "five", {}),
]
# three samples, the middle one bad
BAD_ROWS = [
    (QUESTION, "four", {"answer": "four"}),
    (QUESTION, "bad five", {"answer": "four"}),
    (CHAT, "red", {"answer": "red"}),
]


def _function(path: Path, name: str, **kwargs: Any) -> RewardFunction:
    return RewardFunction(
        kind="function", target=f"tests.reward_fns:{name}", tokenizer_path=str(path), **kwargs
    )


# -- a Python function -----------------------------------------------------------------------


@pytest.mark.unit
def test_a_function_is_called_once_a_batch_with_the_records_fields(tokenizer_path, tokenizer):
    reward = _function(tokenizer_path, "exact_match")
    samples, records = _batch(tokenizer, ROWS)
    # every field goes along, and exact_match takes no "source"
    with pytest.raises(RewardFunctionError, match="unexpected keyword argument 'source'"):
        reward.score(samples, records)
    records[1].pop("source")
    reward_fns.CALLS.clear()
    assert reward.score(samples, records) == [1.0, 0.0, 0.0]
    # one call: the prompts as they are, the responses decoded without the end token, and
    # the field that one record lacks as None
    assert reward_fns.CALLS == [
        {"prompts": [QUESTION, CHAT, QUESTION], "responses": ["four"] * 2 + ["five"],
         "answer": ["four", "red", None]},
    ]  # fmt: skip
    assert reward.score([], []) == []
    assert reward.take_busy_seconds() > 0
    assert reward.take_busy_seconds() == 0
    assert reward.peak_memory_gb()["rss_gb"] > 0


@pytest.mark.unit
@pytest.mark.parametrize(
    ("name", "returned"), [("nan_on_bad", "returned nan (not finite)"),
                           ("text_on_bad", "returned 'high' (not a number)")],
)  # fmt: skip
def test_a_reward_that_is_not_a_finite_number_raises_or_is_skipped(
    tokenizer_path, tokenizer, name, returned
):
    samples, records = _batch(tokenizer, BAD_ROWS)
    with pytest.raises(RewardFunctionError) as e:
        _function(tokenizer_path, name).score(samples, records)
    message = str(e.value)
    assert message == (
        f"reward function tests.reward_fns:{name} {returned} on sample 1 of 3 "
        f"(prompt '{QUESTION}', response 'bad five')"
    )
    # it crosses a process boundary (Ray pickles it) as it is
    assert str(pickle.loads(pickle.dumps(e.value))) == message

    rewards = _function(tokenizer_path, name, on_error="skip").score(samples, records)
    assert rewards[0] == rewards[2] == 1.0 and math.isnan(rewards[1])
    assert [len(c["prompts"]) for c in reward_fns.CALLS] == [3, 3]  # no call a sample


@pytest.mark.unit
def test_a_function_that_raises_is_called_again_on_each_sample_to_find_the_bad_one(
    tokenizer_path, tokenizer
):
    samples, records = _batch(tokenizer, BAD_ROWS)
    with pytest.raises(RewardFunctionError) as e:
        _function(tokenizer_path, "raise_on_bad").score(samples, records)
    assert str(e.value) == (
        "reward function tests.reward_fns:raise_on_bad raised on sample 1 of 3 "
        f"(prompt '{QUESTION}', response 'bad five'): ValueError: cannot score 'bad five'"
    )
    assert isinstance(e.value.__cause__, ValueError)
    # the batch, then one sample at a time up to the one that fails
    assert [c["responses"] for c in reward_fns.CALLS] == [
        ["four", "bad five", "red"], ["four"], ["bad five"]
    ]  # fmt: skip

    reward_fns.CALLS.clear()
    rewards = _function(tokenizer_path, "raise_on_bad", on_error="skip").score(samples, records)
    assert rewards[0] == rewards[2] == 1.0 and math.isnan(rewards[1])
    assert [len(c["prompts"]) for c in reward_fns.CALLS] == [3, 1, 1, 1]
    assert reward_fns.CALLS[3] == {"prompts": [CHAT], "responses": ["red"], "answer": ["red"]}


@pytest.mark.unit
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_wrong_number_of_rewards_is_an_error_even_when_skipping(
    tokenizer_path, tokenizer, on_error
):
    samples, records = _batch(tokenizer, BAD_ROWS)
    with pytest.raises(
        RewardFunctionError,
        match=r"tests\.reward_fns:one_too_many returned 4 rewards for 3 samples ",
    ):
        _function(tokenizer_path, "one_too_many", on_error=on_error).score(samples, records)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("tests.no_such_module:score", "cannot import module 'tests.no_such_module'"),
        ("tests.reward_fns:no_such_fn", "module 'tests.reward_fns' has no attribute 'no_such_fn'"),
        ("tests.reward_fns:NOT_CALLABLE", "'NOT_CALLABLE' is not callable"),
    ],
)
def test_a_target_that_names_no_function_fails_at_start_naming_it(tokenizer_path, target, error):
    with pytest.raises(RewardFunctionError) as e:
        RewardFunction(kind="function", target=target, tokenizer_path=str(tokenizer_path))
    assert str(e.value).startswith(f"reward function {target}: ")
    assert error in str(e.value)
    with pytest.raises(ValueError, match="must be 'module:function'"):
        RewardFunction(kind="function", target="tests.reward_fns", tokenizer_path="unused")


# -- an HTTP endpoint ------------------------------------------------------------------------


class Endpoint:
    """What a test's server was asked (each request's time, headers and JSON body) and how it
    answers request k: `answers[k]` (the last one again after the end). An answer is a function
    of the body (status 200, its value as JSON), a (status, JSON value) pair, or "hang" (no
    answer until the test ends)."""

    def __init__(self, url: str, answers: list[Any]) -> None:
        self.url, self.answers = url, answers
        self.requests: list[tuple[float, dict[str, str], Any]] = []
        self.done = threading.Event()
        self.lock = threading.Lock()

    def answer(self, headers: dict[str, str], body: Any) -> Any:
        with self.lock:
            k = len(self.requests)
            self.requests.append((time.monotonic(), headers, body))
        answer = self.answers[min(k, len(self.answers) - 1)]
        return (200, answer(body)) if callable(answer) else answer

    def gaps(self) -> list[float]:
        times = [t for t, _, _ in self.requests]
        return [b - a for a, b in itertools.pairwise(times)]


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        endpoint: Endpoint = self.server.endpoint  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        answer = endpoint.answer(dict(self.headers), body)
        if answer == "hang":
            endpoint.done.wait(10)
            return
        status, value = answer
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:  # not a line a request on the test's output
        pass


@contextmanager
def serve(*answers: Any) -> Iterator[Endpoint]:
    """A real HTTP server on 127.0.0.1 (a free port), in a thread, for the block."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    host, port = server.server_address[:2]
    endpoint = Endpoint(f"http://{host}:{port}/score", list(answers))
    server.endpoint = endpoint  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint.done.set()
        server.shutdown()
        server.server_close()
        thread.join()


def exact_match(body: dict[str, Any]) -> list[Any]:
    """What a correct endpoint answers: the reward_fns function's rewards, as a plain list."""
    return reward_fns.exact_match(body["prompts"], body["responses"], body["answer"])


def _http(path: Path, url: str, **kwargs: Any) -> RewardFunction:
    kwargs = {"timeout_s": 2.0, "backoff_s": 0.01, **kwargs}
    return RewardFunction(kind="http", target=url, tokenizer_path=str(path), **kwargs)


@pytest.mark.unit
@pytest.mark.parametrize(
    "answer",
    [exact_match, lambda body: {"rewards": exact_match(body)}],
    ids=["list", "rewards"],
)
def test_an_endpoint_gets_the_batch_as_json(tokenizer_path, tokenizer, answer):
    samples, records = _batch(tokenizer, ROWS)
    with serve(answer) as endpoint:
        assert _http(tokenizer_path, endpoint.url).score(samples, records) == [1.0, 0.0, 0.0]
    [(_, headers, body)] = endpoint.requests
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "prompts": [QUESTION, CHAT, QUESTION],
        "responses": ["four", "four", "five"],
        "answer": ["four", "red", None],
        "source": [None, "colours", None],
    }


@pytest.mark.unit
def test_an_endpoints_null_reward_raises_or_is_skipped(tokenizer_path, tokenizer):
    samples, records = _batch(tokenizer, BAD_ROWS)
    with serve(lambda body: {"rewards": [1, None, 0.5]}) as endpoint:
        with pytest.raises(RewardFunctionError) as e:
            _http(tokenizer_path, endpoint.url).score(samples, records)
        assert str(e.value).startswith(
            f"reward endpoint {endpoint.url} returned None (not a number) on sample 1 of 3 "
        )
        rewards = _http(tokenizer_path, endpoint.url, on_error="skip").score(samples, records)
    assert rewards[0] == 1.0 and math.isnan(rewards[1]) and rewards[2] == 0.5


@pytest.mark.unit
def test_an_endpoint_that_answers_503_is_tried_again_after_a_growing_wait(
    tokenizer_path, tokenizer
):
    samples, records = _batch(tokenizer, ROWS)
    busy = (503, {"error": "overloaded"})
    with serve(busy, busy, exact_match) as endpoint:
        reward = _http(tokenizer_path, endpoint.url, retries=3, backoff_s=0.1)
        assert reward.score(samples, records) == [1.0, 0.0, 0.0]
    assert len(endpoint.requests) == 3
    first, second = endpoint.gaps()  # backoff_s, then 2 · backoff_s
    assert 0.1 <= first < 0.2 and 0.2 <= second < 0.3, (first, second)
    # still 503 after the last retry: the error names the endpoint, the tries and the status
    with serve(busy) as endpoint, pytest.raises(RewardFunctionError) as e:
        _http(tokenizer_path, endpoint.url, retries=2).score(samples, records)
    assert str(e.value).startswith(f"reward endpoint {endpoint.url}: failed after 3 tries ")
    assert """the last error: HTTP 503 Service Unavailable: '{"error": "overloaded"}'""" in str(
        e.value
    )


@pytest.mark.unit
def test_an_endpoint_that_hangs_times_out_on_each_try(tokenizer_path, tokenizer):
    samples, records = _batch(tokenizer, ROWS)
    with serve("hang") as endpoint:
        start = time.monotonic()
        with pytest.raises(RewardFunctionError) as e:
            _http(tokenizer_path, endpoint.url, timeout_s=0.2, retries=1).score(samples, records)
        took = time.monotonic() - start
    assert len(endpoint.requests) == 2
    assert 0.4 <= took < 1.5, took
    assert str(e.value).startswith(f"reward endpoint {endpoint.url}: failed after 2 tries ")
    assert str(e.value).endswith("the last error: TimeoutError: timed out")


@pytest.mark.unit
def test_an_endpoint_that_refuses_the_request_with_a_4xx_is_not_tried_again(
    tokenizer_path, tokenizer
):
    samples, records = _batch(tokenizer, ROWS)
    with (
        serve((400, {"detail": "no field 'answer'"})) as endpoint,
        pytest.raises(RewardFunctionError) as e,
    ):
        _http(tokenizer_path, endpoint.url, on_error="skip").score(samples, records)
    assert len(endpoint.requests) == 1
    assert str(e.value) == (
        f"reward endpoint {endpoint.url}: answered HTTP 400 Bad Request: "
        """'{"detail": "no field \\'answer\\'"}' (a 4xx status is not retried)"""
    )


@pytest.mark.unit
def test_an_endpoint_that_is_down_fails_naming_the_url_and_the_tries(tokenizer_path, tokenizer):
    with socket.socket() as s:  # a free port, with nothing listening on it once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    samples, records = _batch(tokenizer, ROWS)
    with pytest.raises(RewardFunctionError) as e:
        _http(tokenizer_path, url, retries=2).score(samples, records)
    assert str(e.value).startswith(f"reward endpoint {url}: failed after 3 tries ")
    assert "the last error: ConnectionRefusedError: [Errno 111] Connection refused" in str(e.value)


# -- as a Ray actor --------------------------------------------------------------------------


@pytest.mark.integration
def test_function_and_endpoint_rewards_as_ray_actors(ray_cluster, tokenizer_path, tokenizer):
    """Both kinds start as the driver starts a scorer (one rank of an ActorGroup) and score a
    batch sent as an object ref; a function's failure reaches the driver naming the function
    and the sample."""
    import ray

    from cluster import ActorGroup, RemoteCallError

    def group(name: str, **kwargs: Any) -> ActorGroup:
        kwargs["tokenizer_path"] = str(tokenizer_path)
        return ActorGroup(RewardFunction, 1, name=name, num_cpus=0.25, actor_kwargs=kwargs)

    samples, records = _batch(tokenizer, ROWS)
    records[1].pop("source")
    bad_samples, bad_records = _batch(tokenizer, BAD_ROWS)
    # both roles start at once (a start takes seconds: the actor imports transformers)
    with (
        serve(exact_match) as endpoint,
        group("reward", kind="function", target="tests.reward_fns:raise_on_bad") as fn,
        group("reward_http", kind="http", target=endpoint.url) as http,
    ):
        for role in (fn, http):
            assert role.call_rank(0, "score", ray.put(samples), records) == [1.0, 0.0, 0.0]
            assert role.call_rank(0, "take_busy_seconds") > 0
            assert role.call_rank(0, "peak_memory_gb")["rss_gb"] > 0
        with pytest.raises(RemoteCallError) as e:
            fn.call_rank(0, "score", ray.put(bad_samples), bad_records)
    message = str(e.value)
    assert message.startswith("reward rank 0: score failed: ")
    assert (
        "reward function tests.reward_fns:raise_on_bad raised on sample 1 of 3 "
        f"(prompt '{QUESTION}', response 'bad five'): ValueError: cannot score 'bad five'"
    ) in message
    assert isinstance(e.value.__cause__, RewardFunctionError)
