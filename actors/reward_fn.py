"""A reward role without a reward model: a user's Python function ("module:function") or a
remote HTTP endpoint scores the decoded responses, in batches.

Both are called with the whole batch as lists, one entry per sample:

    fn(prompts=[...], responses=[...], answer=[...], ...)       kind "function"
    POST {"prompts": [...], "responses": [...], "answer": [...]}  kind "http"

`prompts` are the records' "prompt" as they are (text, or a list of chat messages),
`responses` the decoded response text, and every other field of the prompt records goes
along under its own name (None where a record lacks it). The answer is one number a sample
(for HTTP: a JSON list, or {"rewards": [...]}).

A sample whose reward is not a finite number, or for which the function raises, is an error
that names the function and the sample (`on_error="raise"`), or gets a NaN reward, which the
driver counts as skipped and leaves out of training (`on_error="skip"`). A batched call that
raises is retried one sample at a time, so that one bad sample does not lose its batch. A
reward list of the wrong length, and an endpoint that stays down or refuses the request, are
always errors: they are not about one sample, and skipping every sample would hide them.
"""

from __future__ import annotations

import http.client
import importlib
import json
import math
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from actors.busy import BusyClock

KINDS = ("function", "http")
ON_ERROR = ("raise", "skip")
RESERVED = ("prompts", "responses")  # the argument names that the records' fields join


class RewardFunctionError(RuntimeError):
    """A reward function or endpoint failed; the message names it (and the sample, if one).

    One message argument only, so that it pickles as it is and survives Ray's RayTaskError."""


class _SampleFailure:
    """Why one sample has no reward (becomes a RewardFunctionError, or a NaN when skipped):
    `what` went wrong ("raised", "returned nan (not finite)") and its `detail`, if any."""

    def __init__(self, what: str, detail: str = "") -> None:
        self.what, self.detail = what, detail


class RewardFunction(BusyClock):
    """A reward role that calls a Python function or an HTTP endpoint."""

    def __init__(
        self,
        *,
        kind: str,
        target: str,
        tokenizer_path: str,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        on_error: str = "raise",
        trust_remote_code: bool = False,
        rank: int = 0,  # given by cluster.ActorGroup to every rank; one rank is like another
        world_size: int = 1,
    ) -> None:
        from transformers import AutoTokenizer

        if kind not in KINDS:
            raise ValueError(f"reward kind {kind!r}: must be one of {', '.join(KINDS)}")
        if on_error not in ON_ERROR:
            raise ValueError(f"reward on_error {on_error!r}: must be one of {', '.join(ON_ERROR)}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError(
                f"reward {target}: timeout_s must be > 0, retries and backoff_s >= 0 "
                f"(got {timeout_s}, {retries}, {backoff_s})"
            )
        self.kind, self.target, self.on_error = kind, target, on_error
        self.timeout_s, self.retries, self.backoff_s = float(timeout_s), int(retries), backoff_s
        if kind == "function":
            self.name = f"reward function {target}"
            self.fn = load_function(target)
        else:
            if not target.startswith(("http://", "https://")):
                raise ValueError(f"reward endpoint {target!r}: must be an http:// or https:// URL")
            self.name = f"reward endpoint {target}"
        self.tokenizer = AutoTokenizer.from_pretrained(
            tokenizer_path, trust_remote_code=trust_remote_code
        )

    def score(self, samples: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[float]:
        """One reward a sample (NaN for a skipped one), in the samples' order."""
        if len(samples) != len(records):
            raise ValueError(f"{self.name}: {len(samples)} samples but {len(records)} records")
        if not samples:
            return []
        with self.busy():
            responses = self.tokenizer.batch_decode(
                [s["response_ids"] for s in samples], skip_special_tokens=True
            )
            prompts = [_prompt(r, i) for i, r in enumerate(records)]
            fields = _fields(records)
            if self.kind == "http":
                rewards = self._post(prompts, responses, fields)
            else:
                rewards = self._call_batched(prompts, responses, fields)
            return self._check(rewards, prompts, responses)

    # -- the two ways of asking ------------------------------------------------------------

    def _call_batched(
        self, prompts: list[Any], responses: list[str], fields: dict[str, list[Any]]
    ) -> list[Any]:
        """The function on the whole batch; if it raises, on each sample alone, so that the
        failure lands on the samples that cause it. Returns a value or a _SampleFailure a
        sample."""
        try:
            out = self.fn(prompts=prompts, responses=responses, **fields)
        except Exception:
            pass  # found again below, sample by sample, with its own traceback
        else:
            return self._as_list(out, len(prompts))
        values: list[Any] = []
        for i in range(len(prompts)):
            one = {name: [column[i]] for name, column in fields.items()}
            try:
                out = self.fn(prompts=[prompts[i]], responses=[responses[i]], **one)
            except Exception as e:
                failure = _SampleFailure("raised", f"{type(e).__name__}: {e}")
                if self.on_error == "raise":
                    raise self._sample_error(failure, i, prompts, responses) from e
                values.append(failure)
                continue
            values.extend(self._as_list(out, 1))
        return values

    def _post(
        self, prompts: list[Any], responses: list[str], fields: dict[str, list[Any]]
    ) -> list[Any]:
        """POST the batch as JSON; retry what may pass on a second try (no connection, a
        timeout, a 5xx or 429 status) with exponential backoff; a 4xx is not retried."""
        body = json.dumps({"prompts": prompts, "responses": responses, **fields}).encode()
        tries = 1 + self.retries
        last = ""
        for attempt in range(tries):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))  # backoff_s, 2·backoff_s, ...
            request = urllib.request.Request(
                self.target,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "Accept": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    raw = answer.read()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code} {e.reason}{_body_start(e)}"
                if 400 <= e.code < 500 and e.code != 429:  # the request itself was refused
                    raise RewardFunctionError(
                        f"{self.name}: answered {last} (a 4xx status is not retried)"
                    ) from e
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # no connection, a reset, a timeout (URLError wraps those met while connecting)
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                last = f"{type(reason).__name__}: {reason}" if str(reason) else repr(reason)
            else:
                return self._rewards_of(raw, len(prompts))
        raise RewardFunctionError(
            f"{self.name}: failed after {tries} tries ({self.timeout_s:g} s timeout each, "
            f"backoff from {self.backoff_s:g} s); the last error: {last}"
        )

    def _rewards_of(self, raw: bytes, n: int) -> list[Any]:
        """The rewards in an endpoint's answer: a JSON list, or {"rewards": [...]}."""
        try:
            answer = json.loads(raw)
        except ValueError as e:
            raise RewardFunctionError(
                f"{self.name}: the answer is not JSON ({e}): {_start(raw.decode(errors='replace'))}"
            ) from e
        if isinstance(answer, dict) and "rewards" in answer:
            answer = answer["rewards"]
        if not isinstance(answer, list):
            raise RewardFunctionError(
                f"{self.name}: the answer must be a JSON list of rewards or "
                f'{{"rewards": [...]}}, not {_start(json.dumps(answer))}'
            )
        return self._as_list(answer, n)

    # -- checking what came back -----------------------------------------------------------

    def _as_list(self, out: Any, n: int) -> list[Any]:
        """`out` as a list of n values; anything else is an error, whatever on_error says."""
        if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
            raise RewardFunctionError(
                f"{self.name} returned {_clip(repr(out))}, not a sequence of {n} numbers"
            )
        try:
            values = list(out)
        except TypeError as e:  # e.g. a 0-d array
            raise RewardFunctionError(
                f"{self.name} returned {_clip(repr(out))}, not a sequence of {n} numbers"
            ) from e
        if len(values) != n:
            raise RewardFunctionError(
                f"{self.name} returned {len(values)} rewards for {n} samples "
                f"(expected {n}, got {len(values)})"
            )
        return values

    def _check(self, values: list[Any], prompts: list[Any], responses: list[str]) -> list[float]:
        """Each value as a float; a failure raises (on_error="raise") or becomes NaN."""
        rewards: list[float] = []
        skipped: list[str] = []
        for i, value in enumerate(values):
            failure = value if isinstance(value, _SampleFailure) else _not_a_reward(value)
            if failure is None:
                rewards.append(float(value))
                continue
            error = self._sample_error(failure, i, prompts, responses)
            if self.on_error == "raise":
                raise error
            rewards.append(float("nan"))
            skipped.append(str(error))
        if skipped:  # the reason reaches the run's worker log; the driver counts the NaNs
            print(
                f"{self.name}: skipped {len(skipped)} of {len(values)} samples; "
                f"the first: {skipped[0]}",
                file=sys.stderr,
            )
        return rewards

    def _sample_error(
        self, failure: _SampleFailure, i: int, prompts: list[Any], responses: list[str]
    ) -> RewardFunctionError:
        detail = f": {failure.detail}" if failure.detail else ""
        return RewardFunctionError(
            f"{self.name} {failure.what} on sample {i} of {len(prompts)} "
            f"(prompt {_start(_text_of(prompts[i]))}, response {_start(responses[i])}){detail}"
        )


def load_function(target: str) -> Callable[..., Any]:
    """The function that "module:function" names (the function may be a dotted attribute)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward function {target!r}: must be 'module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # not found, or its own import failed
        raise RewardFunctionError(
            f"reward function {target}: cannot import module {module_name!r}: "
            f"{type(e).__name__}: {e}"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardFunctionError(
                f"reward function {target}: module {module_name!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(f"reward function {target}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]


def _prompt(record: dict[str, Any], i: int) -> Any:
    if "prompt" not in record:
        raise ValueError(f"record {i} of the batch has no 'prompt' field: {sorted(record)}")
    return record["prompt"]


def _fields(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Every field but "prompt", in the order first seen, one value a record (None where a
    record lacks it)."""
    names = list(dict.fromkeys(k for r in records for k in r if k != "prompt"))
    for name in names:
        if name in RESERVED:
            raise ValueError(
                f"the prompt records have a field {name!r}, which is the name of the reward "
                f"function's own argument ({', '.join(RESERVED)}); rename it"
            )
    return {name: [r.get(name) for r in records] for name in names}


def _not_a_reward(value: Any) -> _SampleFailure | None:
    """None if `value` is a finite number, else why not."""
    if value is None or isinstance(value, (str, bytes)):
        return _SampleFailure(f"returned {_clip(repr(value))} (not a number)")
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _SampleFailure(f"returned {_clip(repr(value))} (not a number)")
    if not math.isfinite(x):
        return _SampleFailure(f"returned {x} (not finite)")
    return None


def _text_of(prompt: Any) -> str:
    """A prompt as a person reads its start: the text, or a conversation's last turn."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", prompt[-1]))
    return prompt if isinstance(prompt, str) else repr(prompt)


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[:n] + "…"


def _start(text: str, n: int = 60) -> str:
    """The start of a text, quoted."""
    return repr(_clip(text, n))


def _body_start(e: urllib.error.HTTPError) -> str:
    try:
        body = e.read().decode(errors="replace").strip()
    except Exception:
        return ""
    return f": {_start(body, 200)}" if body else ""
