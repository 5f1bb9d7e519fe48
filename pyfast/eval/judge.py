"""LLM judges for MT-Bench: an OpenAI-compatible chat-completions endpoint or a local HF model.

``--judge openai:MODEL@BASE_URL`` posts ``{model, messages, temperature: 0, max_tokens: 2048}`` to
``BASE_URL/chat/completions`` (urllib; no openai package), with ``Authorization: Bearer $KEY``
when the key's environment variable (OPENAI_API_KEY or ``--judge-key-env NAME``) is set. Network
errors, timeouts, HTTP 429/5xx and malformed responses are retried with exponential backoff;
other HTTP errors (401, 404, ...) fail at once. ``--judge hf:MODEL`` runs a local Hugging Face
model greedily through its chat template (``HFLM.apply_chat_template`` + ``generate_until``).

Ratings are parsed as FastChat's llm_judge does: ``[[x]]``, falling back to ``[x]``; -1 when
neither is found (or the judge failed).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
import urllib.error
import urllib.request

RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
RATING_FALLBACK = re.compile(r"\[(\d+\.?\d*)\]")
MAX_TOKENS = 2048
ERROR = "$ERROR$"  # FastChat's judgement text when the API kept failing


def parse_rating(judgement: str) -> float:
    """The judge's rating: first ``[[x]]``, else first ``[x]``; -1.0 when there is none."""
    m = RATING.search(judgement) or RATING_FALLBACK.search(judgement)
    return float(m.group(1)) if m else -1.0


class JudgeError(RuntimeError):
    """The judge could not produce a judgement (after retries, for the API judge)."""


class OpenAIJudge:
    """A judge behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        key_env: str = "OPENAI_API_KEY",
        key_required: bool = False,
        max_tokens: int = MAX_TOKENS,
        timeout_s: float = 120.0,
        retries: int = 5,
        backoff_s: float = 2.0,
        sleep=time.sleep,
    ):
        if not model or not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"--judge openai:MODEL@BASE_URL needs a model and an http(s) base URL, got "
                f"model={model!r} base_url={base_url!r}"
            )
        self.model, self.url = model, base_url.rstrip("/") + "/chat/completions"
        self.key = os.environ.get(key_env)
        if key_required and not self.key:
            raise ValueError(f"judge API key: environment variable {key_env} is not set")
        self.max_tokens, self.timeout_s = max_tokens, timeout_s
        self.retries, self.backoff_s, self.sleep = retries, backoff_s, sleep
        self.identity = {"kind": "openai", "model": model, "base_url": base_url.rstrip("/")}

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            payload = json.loads(resp.read().decode("utf-8"))
        content = payload["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError("message content is not a string")
        return content

    def complete(self, system: str, user: str) -> str:
        """The judge's reply to one (system, user) exchange, at temperature 0."""
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        data = json.dumps(body).encode("utf-8")
        last = ""
        for attempt in range(self.retries + 1):
            try:
                return self._post(data)
            except urllib.error.HTTPError as exc:
                if exc.code != 429 and exc.code < 500:
                    raise JudgeError(
                        f"judge {self.url} refused the request: HTTP {exc.code} {exc.reason}"
                    ) from None
                last = f"HTTP {exc.code}"
            except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts, resets
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"malformed response ({type(exc).__name__}: {exc})"
            if attempt < self.retries:
                self.sleep(self.backoff_s * 2**attempt)
        raise JudgeError(f"judge {self.url} failed {self.retries + 1} times; last error: {last}")


class LocalJudge:
    """A local model (an LM with apply_chat_template and generate_until), greedy decoding."""

    def __init__(self, lm, spec: str, max_tokens: int = MAX_TOKENS):
        self.lm, self.max_tokens = lm, max_tokens
        self.identity = {"kind": "hf", "model": spec, "loaded": getattr(lm, "identity", {})}

    def complete(self, system: str, user: str) -> str:
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": user})
        prompt = self.lm.apply_chat_template(messages)
        kwargs = {"until": [], "max_gen_toks": self.max_tokens, "do_sample": False}
        return self.lm.generate_until([(prompt, kwargs)])[0]


def parse_judge_spec(spec: str) -> tuple[str, str, str | None]:
    """'openai:MODEL@BASE_URL' -> ('openai', MODEL, BASE_URL); 'hf:MODEL' -> ('hf', MODEL, None)."""
    kind, sep, rest = spec.partition(":")
    if kind == "openai" and sep:
        model, at, url = rest.partition("@")
        if model and at and url:
            return kind, model, url
    elif kind == "hf" and sep and rest:
        return kind, rest, None
    raise ValueError(
        f"--judge {spec!r}: expected openai:MODEL@BASE_URL (e.g. "
        "openai:gpt-4@https://api.openai.com/v1) or hf:MODEL (a model spec such as hf:default)"
    )


def make_judge(
    spec: str, key_env: str | None = None, load_lm=None, max_tokens: int = MAX_TOKENS, **kw
):
    """A judge from its --judge spec; `load_lm(spec)` loads the LM of an hf: judge."""
    kind, model, url = parse_judge_spec(spec)
    if kind == "openai":
        return OpenAIJudge(
            model,
            url,
            key_env=key_env or "OPENAI_API_KEY",
            key_required=key_env is not None,
            max_tokens=max_tokens,
            **kw,
        )
    if load_lm is None:
        raise ValueError("--judge hf:MODEL needs a model loader")
    return LocalJudge(load_lm(model), model, max_tokens=max_tokens)
