"""MT-Bench: answers through a chat template, judging over real HTTP, parsing, caching, reports."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pyfast.eval import mt_bench
from pyfast.eval.data import DataStore
from pyfast.eval.judge import (
    JudgeError,
    LocalJudge,
    OpenAIJudge,
    make_judge,
    parse_judge_spec,
    parse_rating,
)

from .conftest import DATA


class FakeChatLM:
    """Renders conversations as tagged text and answers with a deterministic echo."""

    identity = {"spec": "fake-chat"}

    def __init__(self, reply=None):
        self.requests = []
        self.reply = reply

    def apply_chat_template(self, messages, add_generation_prompt=True):
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return body + ("<assistant>" if add_generation_prompt else "")

    def generate_until(self, requests):
        self.requests.extend(requests)
        if self.reply is not None:
            return [self.reply for _ in requests]
        return [f"  answer {ctx.count('<user>')} to {len(ctx)} chars \n" for ctx, _ in requests]


class ScriptedJudgeServer:
    """An OpenAI-style /v1/chat/completions server on 127.0.0.1 replying from a script.

    Script items: an int (that HTTP status, empty body), bytes (raw 200 body), or a str (a
    well-formed completion with that content); when the script runs out, `default` is used.
    """

    def __init__(self, script=(), default="Fine. Rating: [[5]]"):
        self.script, self.default, self.requests = list(script), default, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                server.requests.append((self.path, dict(self.headers), body))
                item = server.script.pop(0) if server.script else server.default
                if isinstance(item, int):
                    self.send_response(item)
                    self.end_headers()
                    return
                if isinstance(item, str):
                    item = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": item}}]}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(item)))
                self.end_headers()
                self.wfile.write(item)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)


def _judge(url, **kw):
    return OpenAIJudge("judge-model", url, backoff_s=0.0, timeout_s=5, **kw)


def test_rating_patterns_follow_fastchat():
    assert parse_rating("Great answer. Rating: [[8]]") == 8.0
    assert parse_rating("[[7.5]] and later [[2]]") == 7.5
    assert parse_rating("Rating: [6]") == 6.0  # the single-bracket fallback
    assert parse_rating("[[x]] then [3]") == 3.0
    assert parse_rating("I would give it eight out of ten.") == -1.0
    assert parse_rating("") == -1.0


def test_judge_specs():
    assert parse_judge_spec("openai:gpt-4@https://api.openai.com/v1") == (
        "openai",
        "gpt-4",
        "https://api.openai.com/v1",
    )
    assert parse_judge_spec("hf:default") == ("hf", "default", None)
    for bad in ("gpt-4", "openai:gpt-4", "hf:", "local:x"):
        with pytest.raises(ValueError, match="openai:MODEL@BASE_URL"):
            parse_judge_spec(bad)
    with pytest.raises(ValueError, match="http"):
        OpenAIJudge("m", "ftp://x")
    with pytest.raises(ValueError, match="MY_JUDGE_KEY is not set"):
        make_judge("openai:m@http://127.0.0.1:9/v1", key_env="MY_JUDGE_KEY")


def test_openai_judge_over_http_retries_and_sends_the_fastchat_request(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test-123")
    script = [500, b"{not json", b'{"choices": []}', 503, "Solid. Rating: [[9]]"]
    with ScriptedJudgeServer(script) as srv:
        judge = make_judge(f"openai:judge-model@{srv.url}", key_env="MY_JUDGE_KEY", backoff_s=0)
        assert judge.complete("SYSTEM", "USER") == "Solid. Rating: [[9]]"
    assert len(srv.requests) == 5  # four failures retried, then the answer
    path, headers, body = srv.requests[-1]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert body == {
        "model": "judge-model",
        "messages": [{"role": "system", "content": "SYSTEM"}, {"role": "user", "content": "USER"}],
        "temperature": 0,
        "max_tokens": 2048,
    }
    assert judge.identity == {"kind": "openai", "model": "judge-model", "base_url": srv.url}


def test_openai_judge_gives_up_and_client_errors_fail_at_once():
    waits = []
    with ScriptedJudgeServer(default=500) as srv:
        judge = _judge(srv.url, retries=3, sleep=waits.append)
        judge.backoff_s = 0.5
        with pytest.raises(JudgeError, match="failed 4 times; last error: HTTP 500"):
            judge.complete("s", "u")
    assert waits == [0.5, 1.0, 2.0]  # exponential backoff
    with ScriptedJudgeServer(default=401) as srv:
        with pytest.raises(JudgeError, match="HTTP 401"):
            _judge(srv.url).complete("s", "u")
        assert len(srv.requests) == 1
    with pytest.raises(JudgeError, match="ConnectionRefused|URLError"):
        _judge("http://127.0.0.1:9/v1", retries=1).complete("s", "u")


def test_answers_use_the_chat_template_and_category_temperatures():
    questions, _, _ = mt_bench.load(DataStore(DATA))
    assert [q["category"] for q in questions] == [
        "writing",
        "roleplay",
        "reasoning",
        "math",
        "coding",
        "extraction",
        "stem",
        "humanities",
    ]
    lm = FakeChatLM()

    class Memory(mt_bench.Cache):
        def __init__(self):
            self.rows, self.owner_key, self.owner = {}, "model", "fake"

        def put_many(self, rows):
            self.rows.update({r["key"]: r for r in rows})

    answers = mt_bench.generate_answers(lm, questions, Memory(), max_new_tokens=64, seed=1)
    assert len(lm.requests) == 16
    by_ctx = {ctx: kw for ctx, kw in lm.requests}
    first = "<user>" + questions[0]["turns"][0] + "</user><assistant>"
    assert by_ctx[first]["temperature"] == 0.7 and by_ctx[first]["do_sample"] is True
    for q in questions:
        a1, a2 = answers[q["question_id"]]
        assert a1 == f"answer 1 to {len('<user>' + q['turns'][0] + '</user><assistant>')} chars"
        second = (
            f"<user>{q['turns'][0]}</user><assistant>{a1}</assistant>"
            f"<user>{q['turns'][1]}</user><assistant>"
        )
        kw = by_ctx[second]  # turn 2 sees the stripped first answer in the conversation
        assert kw["max_gen_toks"] == 64
        temp = mt_bench.TEMPERATURE[q["category"]]
        assert kw["do_sample"] is (temp > 0) and kw.get("temperature", 0.0) == temp


def test_judge_prompts_pick_reference_guided_templates():
    questions, prompts, refs = mt_bench.load(DataStore(DATA))
    q_math = next(q for q in questions if q["category"] == "math")
    name, system, user = mt_bench.judge_prompt(q_math, ["A1", "A2"], 2, prompts, refs)
    assert name == "single-math-v1-multi-turn" and system == prompts[name]["system_prompt"]
    assert refs[111][1] in user and "A2" in user and q_math["turns"][1] in user
    q_w = questions[0]
    name, _, user = mt_bench.judge_prompt(q_w, ["A1", "A2"], 1, prompts, refs)
    assert name == "single-v1" and user.endswith("[The End of Assistant's Answer]")
    assert q_w["turns"][0] in user and "A1" in user


def test_full_run_with_http_judge_resumes_and_reports(tmp_path):
    out = tmp_path / "run"
    calls = {"n": 0}

    lm = FakeChatLM()
    # 16 judgements: one unparseable, one [x] fallback, then [[k]] ratings
    script = ["no rating here", "Rating: [4]", *[f"ok [[{k}]]" for k in (2, 3, 6, 7, 8, 9)]]
    with ScriptedJudgeServer(script, default="meh [[5]]") as srv:
        judge = _judge(srv.url)
        real = judge.complete

        def flaky(system, user):
            calls["n"] += 1
            if calls["n"] == 9:
                raise KeyboardInterrupt  # an interrupted run
            return real(system, user)

        judge.complete = flaky
        with pytest.raises(KeyboardInterrupt):
            mt_bench.run(lm, judge, data_dir=DATA, output=out, max_new_tokens=8)
        assert len(lm.requests) == 16  # all answers were made and cached
        cached = (out / "mt_bench_judgements.jsonl").read_text().splitlines()
        assert len(cached) == 8
        lm2 = FakeChatLM()
        judge.complete = real
        res = mt_bench.run(lm2, judge, data_dir=DATA, output=out, max_new_tokens=8)
        assert lm2.requests == []  # answers came from the cache
        assert len(srv.requests) == 16  # 8 before the interruption, 8 after
    r = res["results"]
    ratings = [s["ratings"] for s in res["samples"]]
    assert ratings[0] == [-1.0, 4.0]
    assert res["counts"] == {"judgements": 16, "unparseable": 1, "judge_errors": 0}
    valid = [x for pair in ratings for x in pair if x != -1]
    assert r["mt_bench"]["score"] == pytest.approx(sum(valid) / 15)
    assert r["mt_bench"]["turn1"] == pytest.approx(sum(p[0] for p in ratings[1:]) / 7)
    assert r["mt_bench"]["turn2"] == pytest.approx(sum(p[1] for p in ratings) / 8)
    assert r["mt_bench_writing"]["score"] == 4.0 and r["mt_bench_writing"]["n"] == 1
    assert r["mt_bench_roleplay"]["score"] == pytest.approx((2 + 3) / 2)
    assert res["judge"]["model"] == "judge-model"
    cats = {c: r[f"mt_bench_{c}"]["score"] for c in mt_bench.CATEGORIES}
    png = mt_bench.radar_chart(cats, tmp_path / "radar.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a different judge must not reuse these judgements
    with ScriptedJudgeServer() as srv2:
        with pytest.raises(ValueError, match="cached by judge"):
            mt_bench.run(lm2, _judge(srv2.url), data_dir=DATA, output=out)


def test_judge_failures_are_counted_not_cached(tmp_path):
    with ScriptedJudgeServer(default=500) as srv:
        res = mt_bench.run(
            FakeChatLM(),
            _judge(srv.url, retries=1),
            data_dir=DATA,
            output=tmp_path,
            limit=2,
        )
    assert res["counts"] == {"judgements": 4, "unparseable": 0, "judge_errors": 4}
    assert res["results"]["mt_bench"]["score"] is None
    assert not (tmp_path / "mt_bench_judgements.jsonl").exists()


def test_local_judge_renders_the_chat_template():
    lm = FakeChatLM(reply="The answer is fine. [[6]]")
    judge = LocalJudge(lm, "fake", max_tokens=16)
    text = judge.complete("SYS", "USER")
    assert parse_rating(text) == 6.0
    ((ctx, kw),) = lm.requests
    assert ctx == "<system>SYS</system><user>USER</user><assistant>"
    assert kw == {"until": [], "max_gen_toks": 16, "do_sample": False}
    assert judge.identity["kind"] == "hf" and judge.identity["model"] == "fake"


def test_bad_data_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="--output"):
        mt_bench.run(FakeChatLM(), None, data_dir=DATA, output=None)
    with pytest.raises(ValueError, match="--data-dir"):
        mt_bench.load(DataStore(None))
    d = tmp_path / "data" / "mt_bench"
    d.mkdir(parents=True)
    src = DATA / "mt_bench"
    (d / "judge_prompts.jsonl").write_bytes((src / "judge_prompts.jsonl").read_bytes())
    rows = [json.loads(x) for x in (src / "question.jsonl").read_text().splitlines()]
    rows[1]["category"] = "poetry"
    (d / "question.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"question.jsonl:2: category 'poetry'"):
        mt_bench.load(DataStore(tmp_path / "data"))
    rows[1]["category"] = "roleplay"
    (d / "question.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError, match="gpt-4.jsonl"):
        mt_bench.load(DataStore(tmp_path / "data"))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture
def chat_lm(tiny_model, tiny_tokenizer):
    import copy

    from pyfast.eval import HFLM

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    return HFLM(tiny_model, tok, batch_size=8)


def test_evaluate_mt_bench_with_a_tiny_model_and_an_http_judge(chat_lm, tmp_path):
    from pyfast.eval import evaluate
    from pyfast.eval.report import write_run

    out_dir = tmp_path / "run"
    script = ["[[8]]", "[[6]]", "Rating: [7]", "[[5]]", "no verdict", "[[4]]", "[[9]]", "[[3]]"]
    with ScriptedJudgeServer(script) as srv:
        opts = {"judge": f"openai:judge-model@{srv.url}", "judge_key_env": None}
        out = evaluate(
            chat_lm,
            "mt_bench",
            data_dir=DATA,
            limit=8,  # documents are (question, turn) pairs: writing, roleplay, reasoning, math
            output=str(out_dir),
            gen_kwargs={"max_gen_toks": 4},
            task_options=opts,
            log_samples=True,
        )
        first = srv.requests[0][2]["messages"][1]["content"]
    r = out["results"]["mt_bench"]
    assert r["n"] == 8 and r["unparseable"] == pytest.approx(1 / 8)
    assert r["score"] == pytest.approx((8 + 6 + 7 + 5 + 4 + 9 + 3) / 7)
    assert r["turn1"] == pytest.approx((8 + 7 + 9) / 3)  # reasoning's turn 1 is unparseable
    assert r["turn2"] == pytest.approx((6 + 5 + 4 + 3) / 4)
    assert r["writing"] == 7.0 and r["reasoning"] == 4.0 and r["math"] == 6.0
    info = out["task_info"]["mt_bench"]
    assert info["judge"]["model"] == "judge-model" and info["unparseable"] == 1
    samples = out["samples"]["mt_bench"]
    prompts = [s["judge_prompt"] for s in samples]
    assert (
        prompts
        == ["single-v1", "single-v1-multi-turn"] * 2
        + [
            "single-math-v1",
            "single-math-v1-multi-turn",
        ]
        * 2
    )
    assert samples[0]["answers"][0] in first  # the model's own answer reached the judge
    written = {p.name for p in write_run(out, out_dir)}
    assert {"mt_bench_radar.png", "results.json", "samples_mt_bench.jsonl"} <= written
    assert (out_dir / "mt_bench_answers.jsonl").exists()


def test_local_hf_judge_through_evaluate(chat_lm, tmp_path):
    from pyfast.eval import evaluate

    loaded = []

    def loader(spec):
        loaded.append(spec)
        return chat_lm  # the tiny model judges itself (its ratings are noise)

    out = evaluate(
        chat_lm,
        "mt_bench",
        data_dir=DATA,
        limit=2,
        output=str(tmp_path),
        gen_kwargs={"max_gen_toks": 4},
        task_options={"judge": "hf:tiny", "judge_loader": loader, "judge_max_tokens": 6},
    )
    assert loaded == ["tiny"]
    info = out["task_info"]["mt_bench"]
    assert info["judge"]["kind"] == "hf" and info["judge"]["model"] == "tiny"
    assert info["judgements"] == 2 and info["judge_errors"] == 0
    rows = [
        json.loads(x) for x in (tmp_path / "mt_bench_judgements.jsonl").read_text().splitlines()
    ]
    assert [r["key"] for r in rows] == ["81:1", "81:2"]
    assert all(r["judge"]["kind"] == "hf" for r in rows)


def test_cli_mt_bench_argument_errors(capsys, tmp_path):
    from pyfast.cli import main

    base = ["eval", "--tasks", "mt_bench", "--data-dir", str(DATA)]
    assert main(base) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert main([*base, "--judge", "gpt-4"]) == 2
    assert "openai:MODEL@BASE_URL" in capsys.readouterr().err
    assert main([*base, "--judge", "hf:default"]) == 2
    assert "needs --output DIR" in capsys.readouterr().err


def test_ls_tasks_lists_both(capsys):
    from pyfast.cli import main

    assert main(["ls", "tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    he = next(x for x in lines if x.startswith("humaneval "))
    mt = next(x for x in lines if x.startswith("mt_bench "))
    assert "openai/openai_humaneval" in he and "pass@1" in he
    assert "--data-dir" in mt and "turn2" in mt
