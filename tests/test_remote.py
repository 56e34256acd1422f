"""Rewards and judges behind HTTP (reward_models/remote.py) against a local server started here:
good answers, slow ones, errors, garbage; the key, the cache, the request cap, the concurrency
limit; and an eval stage judged through both, cross-checked with the same verdicts computed locally."""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.config import parse_reward
from reward_models import build_reward, remote
from reward_models.remote import RemoteError, RequestCapReached


class Endpoint:
    """What the test server answers, by path; every request is recorded."""

    def __init__(self):
        self.requests: list[tuple[str, dict, dict]] = []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        self.flaky_left = 0

    def answer(self, path: str, body: dict) -> tuple[int, str]:
        if path == "/score" or path == "/slowish":
            if path == "/slowish":  # held until a second request is in flight (2 s at most: the last one alone),
                deadline = time.time() + 2.0  # so a client that keeps two going is seen with two, however loaded the
                while time.time() < deadline:  # machine; then a moment more, in which a third would arrive
                    with self.lock:
                        if self.in_flight >= 2:
                            break
                    time.sleep(0.01)
                time.sleep(0.05)
            rewards = [float(len(c)) + (1.0 if "yes" in c else 0.0) for c in body["completions"]]
            return 200, json.dumps({"rewards": rewards})
        if path == "/yes":  # 1 when the answer says yes: the contains_marker rule, served
            return 200, json.dumps({"rewards": [float("yes" in c.lower()) for c in body["completions"]]})
        if path == "/flaky":
            with self.lock:
                self.flaky_left -= 1
                failing = self.flaky_left >= 0
            return (503, "busy") if failing else (200, json.dumps({"rewards": [0.5] * len(body["completions"])}))
        if path == "/slow":
            time.sleep(1.0)
            return 200, json.dumps({"rewards": [0.0] * len(body["completions"])})
        if path == "/bad-request":
            return 400, "no such model"
        if path == "/garbage":
            return 200, "<html>oops</html>"
        if path == "/short":
            return 200, json.dumps({"rewards": [1.0] * (len(body["completions"]) - 1)})
        if path == "/nan":
            return 200, json.dumps({"rewards": [float("nan")] + [1.0] * (len(body["completions"]) - 1)})
        if path == "/text":
            return 200, json.dumps({"rewards": ["0.5"] * len(body["completions"])})
        if path == "/other-field":
            return 200, json.dumps({"scores": [1.0] * len(body["completions"])})
        if path.endswith("/chat/completions"):
            return 200, json.dumps(openai_answer(path, body))
        return 404, "not found"


def openai_answer(path: str, body: dict) -> dict:
    """A fake chat completion: pairwise, the answer that says yes wins (P 0.9); pointwise, 'Yes' when it
    says yes. /v1 answers with top log-probabilities, /text-only/v1 with the letter alone,
    /chatty/v1 with a word that is neither option."""
    question = body["messages"][0]["content"]
    if "chatty" in path:
        return {"choices": [{"message": {"content": "Maybe"}}]}
    found = re.search(r"Answer A:\n(.*)\n\nAnswer B:\n(.*)\n\nWhich", question, re.S)
    if found:
        a, b = ("yes" in x.lower() for x in found.groups())
        options, p_first = ("A", "B"), 0.5 if a == b else (0.9 if a else 0.1)
    else:
        answer = re.search(r"Answer:\n(.*)\n\nIs this", question, re.S).group(1)
        options, p_first = ("Yes", "No"), (0.8 if "yes" in answer.lower() else 0.3)
    text = options[0] if p_first >= 0.5 else options[1]
    choice = {"message": {"role": "assistant", "content": text}}
    if "text-only" not in path:
        top = [
            {"token": options[0], "logprob": math.log(p_first)},
            {"token": options[1], "logprob": math.log(1 - p_first)},
        ]
        choice["logprobs"] = {"content": [{"token": text, "logprob": 0.0, "top_logprobs": top}]}
    return {"choices": [choice]}


@pytest.fixture
def server(monkeypatch, tmp_path):
    endpoint = Endpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with endpoint.lock:
                endpoint.requests.append((self.path, dict(self.headers), body))
                endpoint.in_flight += 1
                endpoint.most_in_flight = max(endpoint.most_in_flight, endpoint.in_flight)
            try:
                status, text = endpoint.answer(self.path, body)
            finally:
                with endpoint.lock:
                    endpoint.in_flight -= 1
            data = text.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.01)
    endpoint.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield endpoint
    httpd.shutdown()


def reward(server, path: str, **options):
    return build_reward({"type": "remote", "url": server.url + path, **options})


PROMPTS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]
ANSWERS = ["yes", "no", "a yes", "four", "maybe yes"]


def test_batches_columns_key_and_cache(server, monkeypatch, tmp_path):
    monkeypatch.setenv("SCORER_KEY", "secret-123")
    score = reward(server, "/score", batch_size=2, api_key_env="SCORER_KEY")
    got = score(PROMPTS, ANSWERS, reference=["r0", "r1", "r2", "r3", "r4"])
    assert got == [4.0, 2.0, 6.0, 4.0, 10.0]
    assert len(server.requests) == 3  # 5 answers, 2 per request
    assert all(headers["Authorization"] == "Bearer secret-123" for _, headers, _ in server.requests)
    bodies = sorted((body for _, _, body in server.requests), key=lambda b: b["reference"])  # sent concurrently
    assert bodies[0] == {"prompts": PROMPTS[:2], "completions": ANSWERS[:2], "reference": ["r0", "r1"]}
    cached = list((tmp_path / "cache" / "responses").rglob("*.json"))
    assert len(cached) == 3 and not any("secret" in f.read_text() for f in cached)
    # a second run (a resumed stage) pays nothing; without the cache it pays again
    assert score(PROMPTS, ANSWERS, reference=["r0", "r1", "r2", "r3", "r4"]) == got and len(server.requests) == 3
    assert reward(server, "/score", batch_size=2, cache=False)(PROMPTS, ANSWERS) == got and len(server.requests) == 6


def test_busy_server_is_retried_with_backoff(server):
    server.flaky_left = 2
    assert reward(server, "/flaky", batch_size=8, retries=3)(PROMPTS, ANSWERS) == [0.5] * 5
    assert len(server.requests) == 3  # two 503s, then the answer
    server.flaky_left = 5
    with pytest.raises(RemoteError, match=r"request 1 of 1 \(answers 0-4\): HTTP 503"):
        reward(server, "/flaky", batch_size=8, retries=2, cache=False)(PROMPTS, ANSWERS)


@pytest.mark.parametrize(
    "path, options, message",
    [
        ("/slow", {"timeout": 0.2, "retries": 1}, r"no answer from .*/slow after 2 attempt\(s\) \(timeout 0.2 s\)"),
        ("/bad-request", {}, r"HTTP 400 .*'no such model'"),
        ("/garbage", {}, r"not JSON: '<html>oops</html>'"),
        ("/short", {}, r"'rewards': expected 5 numbers \(one per answer sent\), got 4"),
        ("/nan", {}, r"item 0 is nan, not a finite number"),
        ("/text", {}, r"item 0 is '0.5', not a finite number"),
        ("/other-field", {}, r"no 'rewards' field"),
    ],
)
def test_errors_and_garbage_are_named_never_a_silent_zero(server, path, options, message):
    score = reward(server, path, batch_size=8, **options)
    with pytest.raises(RemoteError, match=message):
        score(PROMPTS, ANSWERS)
    if path == "/bad-request":
        assert len(server.requests) == 1  # a client error is not retried
    with pytest.raises(RemoteError):  # nothing bad was cached: asking again asks the server again
        score(PROMPTS, ANSWERS)


def test_concurrency_is_limited(server):
    reward(server, "/slowish", batch_size=1, concurrency=2)(PROMPTS, ANSWERS)
    assert len(server.requests) == 5 and server.most_in_flight == 2


def test_request_cap_stops_cleanly_and_a_resume_pays_only_for_the_rest(server):
    with pytest.raises(RequestCapReached, match="max_requests=2 .* raise max_requests and resume"):
        reward(server, "/score", batch_size=1, concurrency=1, max_requests=2)(PROMPTS, ANSWERS)
    assert len(server.requests) == 2
    # the next run, with the cap raised to the 3 requests still missing, finishes on cached answers
    assert reward(server, "/score", batch_size=1, max_requests=3)(PROMPTS, ANSWERS) == [4.0, 2.0, 6.0, 4.0, 10.0]
    assert len(server.requests) == 5


def test_the_key_is_read_from_a_named_variable_only(monkeypatch):
    monkeypatch.delenv("NOT_SET_KEY", raising=False)
    with pytest.raises(RemoteError, match="NOT_SET_KEY"):  # a user error: exit 2 with this line, no traceback
        build_reward({"type": "remote", "url": "http://127.0.0.1:9/x", "api_key_env": "NOT_SET_KEY"})
    with pytest.raises(ValueError, match="names an environment variable"):
        parse_reward({"type": "openai", "model": "m", "api_key_env": "sk-abcdef0123"})
    with pytest.raises(ValueError, match="http"):
        parse_reward({"type": "remote", "url": "localhost:8000"})


def test_openai_judge_pairwise_pointwise_and_bad_answers(server):
    judge = build_reward({"type": "openai", "model": "m", "base_url": server.url + "/v1", "api_key_env": None})
    prompts = PROMPTS[:3]
    p = judge.compare(prompts, ["yes", "no", "yes"], ["no", "yes", "yes indeed"])
    assert p == pytest.approx([0.9, 0.1, 0.5])  # both orders agree: (0.9 + (1 - 0.1)) / 2
    assert judge.last_position_bias == pytest.approx(1 / 3)  # the tie: slot A both times
    body = next(b for _, _, b in server.requests if "Answer A:\nyes\n\nAnswer B:\nno" in b["messages"][0]["content"])
    assert body["model"] == "m" and body["max_tokens"] == 1 and body["logprobs"] is True
    text_only = build_reward(
        {"type": "openai", "model": "m", "base_url": server.url + "/text-only/v1", "api_key_env": None}
    )
    assert text_only.compare(prompts[:2], ["yes", "no"], ["no", "yes"]) == [1.0, 0.0]
    pointwise = build_reward(
        {"type": "openai", "model": "m", "mode": "pointwise", "base_url": server.url + "/v1", "api_key_env": None}
    )
    assert pointwise(prompts[:2], ["yes", "no"]) == pytest.approx([0.8, 0.3])
    chatty = build_reward({"type": "openai", "model": "m", "base_url": server.url + "/chatty/v1", "api_key_env": None})
    with pytest.raises(RemoteError, match=r"question 1 of 1: the judge answered 'Maybe', not A or B"):
        chatty.compare(prompts[:1], ["yes"], ["no"])


def test_an_eval_stage_judged_over_http_agrees_with_the_same_verdicts_computed_here(
    server, tmp_path, yes_no_model, tiny_llama, monkeypatch
):
    """The yes/no SFT stage against its base, judged by (1) a served 'says yes' reward, (2) an API judge
    that prefers the answer saying yes, (3) the local contains_marker rule: the served reward's
    table equals the rule's, and the API judge's wins are the rule's wins."""
    from conftest import write_jsonl

    from align.config import EvalConfig
    from align.stages.evaluate import run_eval

    monkeypatch.setenv("JUDGE_KEY", "k")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Pick one."}] * 8)
    cfg = EvalConfig.model_validate(
        {
            "model": {"name": str(tiny_llama), "precision": "fp32"},  # base: the random model it was trained from
            "quantization": {"mode": "none"},
            "policy": str(yes_no_model.parent),
            "judges": {
                "rule": {"type": "rule", "name": "contains_marker", "marker": "yes"},
                "served": {"type": "remote", "url": server.url + "/yes", "api_key_env": "JUDGE_KEY"},
                "api": {"type": "openai", "model": "m", "base_url": server.url + "/v1", "api_key_env": "JUDGE_KEY"},
            },
            "data": {"eval": str(prompts)},
            "rollout": {"engine": "hf", "max_new_tokens": 4, "temperature": 1.0},
            "bootstrap": 100,
        }
    )
    report = json.loads((run_eval(cfg, tmp_path / "out") / "report.json").read_text())
    results = {r["judge"]: r for r in report["results"]}
    keys = ("wins", "ties", "losses", "win_rate")
    assert {k: results["served"][k] for k in keys} == {k: results["rule"][k] for k in keys}
    assert results["api"]["wins"] == results["rule"]["wins"] and results["api"]["position_bias"] is not None
    assert results["rule"]["wins"] > 0  # the policy says yes where the base does not


def test_the_standalone_evals_judge_flag_reads_remote_and_openai(monkeypatch):
    from align.standalone_eval import judge_spec

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    assert judge_spec("remote:http://h/score").url == "http://h/score"
    spec = judge_spec("openai-pointwise:gpt-x")
    assert (spec.type, spec.model, spec.mode, spec.base_url, spec.api_key_env) == (
        "openai",
        "gpt-x",
        "pointwise",
        "http://127.0.0.1:8000/v1",
        "OPENAI_API_KEY",
    )
