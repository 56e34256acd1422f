"""Rewards and judges behind an HTTP endpoint: a served reward model or verifier (``type: remote``)
and an LLM judge behind an OpenAI-compatible chat API (``type: openai``).

A remote reward is POSTed a batch as JSON and answers with one number per answer:

    request   {"prompts": [[{"role", "content"}, ...], ...], "completions": ["...", ...], "<column>": [...]}
    response  {"rewards": [0.7, -1.2, ...]}        exactly one finite number per completion

The OpenAI judge asks the same questions as the local judge (reward_models/judge.py) with
max_tokens 1 and reads P(A) / (P(A) + P(B)) from the top log-probabilities when the API returns
them, else the answer's letter (1 or 0).

What every request gets (written here on the standard library: none of our dependencies has an HTTP
client with retries, a response cache and a request cap together):
- the API key from the environment variable the recipe names, as a Bearer token; never written down;
- a timeout; retries with exponential backoff (Retry-After honoured) on timeouts, refused
  connections, 429 and 5xx; any other status is an error at once;
- at most ``concurrency`` requests in flight;
- a cache on disk (ALIGN_CACHE/responses) keyed by the URL and the request body, so a resumed or
  re-run stage pays for a request once; only valid responses are kept;
- ``max_requests``: the stage stops cleanly (``RequestCapReached``) when this process has sent that
  many; what was answered stays cached, so resuming after raising the cap pays only for the rest;
- strict validation: anything but the expected shape (not JSON, a missing field, a wrong count, a
  score that is not a finite number) is an error naming the request, never a silent 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from reward_models.judge import Verdicts

BACKOFF_SECONDS = 0.5  # first retry's wait; doubles each time, at most MAX_BACKOFF_SECONDS
MAX_BACKOFF_SECONDS = 30.0
RETRIED_STATUS = {408, 429, 500, 502, 503, 504}


class RemoteError(RuntimeError):
    """A request failed or came back unusable; the message names the request."""


class RequestCapReached(RemoteError):
    """max_requests reached: the stage stops here, cleanly (what was answered is cached)."""


def response_cache() -> Path:
    from align.models.resolve import cache_dir

    return cache_dir() / "responses"


class HttpClient:
    """POSTs JSON bodies with the spec's key, timeout, retries, concurrency, cache and cap."""

    def __init__(self, spec, what: str):
        self.spec, self.what = spec, what
        self.key = None
        if spec.api_key_env:
            self.key = os.environ.get(spec.api_key_env)
            if not self.key:
                raise RemoteError(f"{what}: the environment variable {spec.api_key_env} (its API key) is not set")
        self.sent = 0
        self._lock = threading.Lock()

    def post_many(self, url: str, bodies: list[dict], labels: list[str], validate) -> list[Any]:
        """Every body's response, in order, at most ``concurrency`` in flight; ``validate(response,
        label, body)`` raises on a bad one (before it is cached)."""
        with ThreadPoolExecutor(self.spec.concurrency) as pool:
            futures = [
                pool.submit(self.request, url, body, label, lambda r, label=label, body=body: validate(r, label, body))
                for body, label in zip(bodies, labels)
            ]
            return [future.result() for future in futures]

    def _cache_file(self, url: str, body: dict) -> Path | None:
        if not self.spec.cache:
            return None
        digest = hashlib.sha256(json.dumps({"url": url, "body": body}, sort_keys=True).encode()).hexdigest()
        return response_cache() / digest[:2] / f"{digest}.json"

    def _count(self, label: str) -> None:
        with self._lock:
            cap = self.spec.max_requests
            if cap is not None and self.sent >= cap:
                raise RequestCapReached(
                    f"{self.what}: stopped before {label}: max_requests={cap} requests sent by this run. The answers "
                    "so far are cached; raise max_requests and resume (--resume) to pay only for the rest."
                )
            self.sent += 1

    def request(self, url: str, body: dict | None, label: str, validate=None, text: bool = False) -> Any:
        """One request's parsed JSON response (``validate`` raises on a bad one before it is cached):
        a POST of ``body``, or a GET (never cached) when ``body`` is None; ``text``: the response as
        sent (an endpoint answering plain text), not parsed and not cached."""
        try:
            data = None if body is None else json.dumps(body).encode()
        except (TypeError, ValueError) as err:
            raise RemoteError(f"{self.what}, {label}: the request cannot be sent as JSON ({err})") from None
        cached = None if body is None or text else self._cache_file(url, body)
        if cached is not None and cached.exists():
            return json.loads(cached.read_text())
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.spec.retries + 1):
            self._count(label)
            last = attempt == self.spec.retries
            wait = min(BACKOFF_SECONDS * 2**attempt, MAX_BACKOFF_SECONDS)
            try:
                request = urllib.request.Request(
                    url, data=data, headers=headers, method="GET" if data is None else "POST"
                )
                with urllib.request.urlopen(request, timeout=self.spec.timeout) as response:
                    answer = response.read().decode("utf-8", errors="replace")
                break
            except urllib.error.HTTPError as err:
                detail = err.read().decode("utf-8", errors="replace")[:200]
                if err.code not in RETRIED_STATUS or last:
                    raise RemoteError(f"{self.what}, {label}: HTTP {err.code} from {url}: {detail!r}") from None
                after = err.headers.get("Retry-After") if err.headers else None
                wait = min(float(after), MAX_BACKOFF_SECONDS) if after and after.isdigit() else wait
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                if last:
                    raise RemoteError(
                        f"{self.what}, {label}: no answer from {url} after {attempt + 1} attempt(s) "
                        f"(timeout {self.spec.timeout:g} s): {getattr(err, 'reason', err)}"
                    ) from None
            time.sleep(wait)
        if text:
            return answer
        try:
            parsed = json.loads(answer)
        except json.JSONDecodeError:
            raise RemoteError(f"{self.what}, {label}: the response from {url} is not JSON: {answer[:200]!r}") from None
        if validate is not None:
            validate(parsed)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            temporary = cached.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            temporary.write_text(json.dumps(parsed))
            temporary.replace(cached)
        return parsed


def finite_numbers(values: Any, count: int, where: str) -> list[float]:
    """``values`` as ``count`` finite floats, or a RemoteError saying what is wrong and where."""
    if not isinstance(values, list):
        raise RemoteError(f"{where}: expected a list of {count} numbers, got {type(values).__name__}")
    if len(values) != count:
        raise RemoteError(f"{where}: expected {count} numbers (one per answer sent), got {len(values)}")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RemoteError(f"{where}: item {index} is {value!r}, not a finite number")
    return [float(v) for v in values]


class RemoteReward:
    """A reward scored by an HTTP endpoint, ``batch_size`` answers per request (see the module doc)."""

    def __init__(self, spec):
        self.spec, self.name = spec, f"remote:{spec.url}"
        self.client = HttpClient(spec, f"remote reward {spec.url}")

    def __call__(self, prompts, completions, **columns) -> list[float]:
        size = self.spec.batch_size
        starts = list(range(0, len(completions), size))
        bodies = [
            {
                "prompts": prompts[s : s + size],
                "completions": completions[s : s + size],
                **{k: list(v[s : s + size]) for k, v in columns.items()},
            }
            for s in starts
        ]
        labels = [
            f"request {i + 1} of {len(starts)} (answers {s}-{s + len(b['completions']) - 1})"
            for i, (s, b) in enumerate(zip(starts, bodies))
        ]

        responses = self.client.post_many(self.spec.url, bodies, labels, self._check)
        return [float(v) for response in responses for v in response["rewards"]]

    def _check(self, response: Any, label: str, body: dict) -> None:
        where = f"{self.client.what}, {label}"
        if not isinstance(response, dict) or "rewards" not in response:
            raise RemoteError(f"{where}: the response has no 'rewards' field: {str(response)[:200]}")
        finite_numbers(response["rewards"], len(body["completions"]), f"{where}, 'rewards'")


class OpenAIJudge(Verdicts):
    """The local judge's questions asked of a model behind an OpenAI-compatible chat completions API."""

    def __init__(self, spec):
        self.spec, self.mode = spec, spec.mode
        self.name = f"openai:{spec.model}:{spec.mode}"
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self.client = HttpClient(spec, f"openai judge {spec.model} at {spec.base_url}")
        self.options = ("A", "B") if spec.mode == "pairwise" else ("Yes", "No")

    def _choice_probs(self, questions: list[str]) -> list[float]:
        bodies = [
            {
                "model": self.spec.model,
                "messages": [{"role": "user", "content": q}],
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 5,
            }
            for q in questions
        ]
        labels = [f"question {i + 1} of {len(bodies)}" for i in range(len(bodies))]

        responses = self.client.post_many(self.url, bodies, labels, lambda r, label, _: self._probability(r, label))
        return [self._probability(response, label) for response, label in zip(responses, labels)]

    def _probability(self, response: Any, label: str) -> float:
        """P(first option) from the top log-probabilities of the first token, else from its text."""
        where = f"{self.client.what}, {label}"
        try:
            choice = response["choices"][0]
            text = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RemoteError(
                f"{where}: no choices[0].message.content in the response: {str(response)[:200]}"
            ) from None
        if not isinstance(text, str):
            raise RemoteError(f"{where}: the answer is {text!r}, not text")
        first, second = self.options
        top = ((choice.get("logprobs") or {}).get("content") or [{}])[0].get("top_logprobs") or []
        mass = {first: 0.0, second: 0.0}
        for entry in top:
            token = str(entry.get("token", "")).strip().lower()
            logprob = entry.get("logprob")
            for option in mass:
                if token == option.lower() and isinstance(logprob, (int, float)) and math.isfinite(logprob):
                    mass[option] += math.exp(logprob)
        if mass[first] + mass[second] > 0:
            return mass[first] / (mass[first] + mass[second])
        answer = text.strip().lower()
        if answer.startswith(first.lower()):
            return 1.0
        if answer.startswith(second.lower()):
            return 0.0
        raise RemoteError(f"{where}: the judge answered {text!r}, not {first} or {second}")
