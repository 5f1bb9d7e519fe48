"""Runs that survive interruption: per-document generation caches, per-request log-likelihood
caches, and sharded generation.

``<output>/generations_<task>.jsonl`` (``.rank<r>.jsonl`` per rank under torchrun) starts with a
header line ``{"task", "model"}``; then one line per finished document
``{"doc_id", "key", "generations"}``, appended (flushed and fsynced) as soon as the document's
last request is generated. ``key`` is the sha256 of the document's requests (prompt and
generation kwargs), so a resumed run reuses only generations of unchanged requests. On start the
file is rewritten atomically: header only for a fresh run, header + the valid cached lines with
``--resume`` (a line torn by a crash at the end of the file is dropped).

``<output>/loglikelihood_<task>.jsonl`` is the same for log-likelihood tasks: a header
``{"task", "model", "scoring"}``, then one line per finished chunk of documents ``{"chunk",
"key", "answers"}`` with the (log-likelihood, is_greedy) answer of each of the chunk's requests.
A task's requests are cut into chunks at fixed document boundaries (:func:`ll_chunks`) whether
or not anything is cached, so a resumed run scores the missing chunks exactly as the
uninterrupted run did and gives the same numbers, bit for bit.

The header's model identity includes a fingerprint of the weights (:func:`weights_fingerprint`),
so a retrained model in the same folder, another dtype or another max_length never reuses them.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

from pyfast.io import atomic_write

_CHUNK_DOCS = 8  # documents per generate_until call for LMs without a callback


def request_key(requests: list) -> str:
    return hashlib.sha256(json.dumps(requests, sort_keys=True).encode("utf-8")).hexdigest()


def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and up to 4096 evenly spaced values:
    cheap (no full pass over the weights) and different for any retrained model in practice."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, min(4096, flat.numel())).long()
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[idx.to(flat.device)].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _model_id(lm) -> dict:
    ident = getattr(lm, "identity", None) or {"spec": type(lm).__name__}
    out = {k: ident.get(k) for k in ("spec", "architecture", "parameters", "dtype", "sha256")
           if k in ident}  # fmt: skip
    model = getattr(lm, "model", None)
    if model is not None and hasattr(model, "named_parameters"):
        if not hasattr(lm, "_weights_fingerprint"):
            lm._weights_fingerprint = weights_fingerprint(model)
        out["weights"] = lm._weights_fingerprint
    return out


class GenerationCache:
    """The cache file of one task in one run folder (see the module docstring)."""

    def __init__(self, path: Path, header: dict, entries: dict[int, dict]):
        self.path, self.header, self.entries = path, header, entries

    @classmethod
    def for_task(cls, folder, task: str, lm, resume: bool) -> GenerationCache:
        from pyfast.eval.evaluator import _world

        folder = Path(folder)
        rank, world = _world()
        header = {"task": task, "model": _model_id(lm)}
        entries: dict[int, dict] = {}
        if resume:
            files = [folder / f"generations_{task}.jsonl",
                     *sorted(folder.glob(f"generations_{task}.rank*.jsonl"))]  # fmt: skip
            for f in files:
                if f.is_file():
                    entries.update(cls._read(f, header))
        name = f"generations_{task}.jsonl" if world == 1 else f"generations_{task}.rank{rank}.jsonl"
        path = folder / name
        lines = [header, *entries.values()]

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in lines:
                    f.write(json.dumps(line, ensure_ascii=False) + "\n")

        atomic_write(path, write)
        return cls(path, header, entries)

    @staticmethod
    def _read(
        path: Path, header: dict, what: str = "generations", fields=("doc_id", "key", "generations")
    ) -> dict[int, dict]:
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        entries: dict[int, dict] = {}
        for lineno, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if lineno == len(lines):
                    break  # the last line was cut by the interruption: that document is redone
                raise ValueError(f"{path}:{lineno}: malformed cache line") from None
            if lineno == 1:
                if row != header:
                    raise ValueError(
                        f"{path}: cached {what} were made for {row}, not {header}; "
                        "drop --resume or use another --output folder"
                    )
                continue
            if not (isinstance(row, dict) and set(fields) <= set(row)):
                raise ValueError(f"{path}:{lineno}: a cache line needs {', '.join(fields)}")
            entries[int(row[fields[0]])] = row
        return entries

    def get(self, doc_id: int, key: str) -> list[str] | None:
        e = self.entries.get(doc_id)
        return e["generations"] if e is not None and e["key"] == key else None

    def append(self, doc_id: int, key: str, generations: list[str]) -> None:
        row = {"doc_id": doc_id, "key": key, "generations": generations}
        self.entries[doc_id] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _generate_docs(lm, docs: list[tuple[int, list]], on_doc, on_request=None) -> dict[int, list]:
    """Generates the requests of `docs` [(doc_id, requests)]; `on_doc(doc_id, texts)` runs as
    soon as a document's last request is done, `on_request()` after every request (progress).
    Returns {doc_id: texts}."""
    flat, owner = [], []
    got: dict[int, list] = {}
    left: dict[int, int] = {}
    for d, reqs in docs:
        got[d], left[d] = [None] * len(reqs), len(reqs)
        for j, r in enumerate(reqs):
            flat.append(tuple(r))
            owner.append((d, j))
    done = [False] * len(flat)

    def deliver(i: int, text: str, base: int = 0) -> None:
        i += base
        if done[i]:
            return
        done[i] = True
        d, j = owner[i]
        got[d][j] = text
        left[d] -= 1
        if on_request is not None:
            on_request()
        if left[d] == 0:
            on_doc(d, got[d])

    if "callback" in inspect.signature(lm.generate_until).parameters:
        for i, text in enumerate(lm.generate_until(flat, callback=deliver)):
            deliver(i, text)
    else:  # a few documents per call, so an interruption loses little
        starts = [0]
        for _, reqs in docs:
            starts.append(starts[-1] + len(reqs))
        for c in range(0, len(docs), _CHUNK_DOCS):
            a, b = starts[c], starts[min(c + _CHUNK_DOCS, len(docs))]
            for i, text in enumerate(lm.generate_until(flat[a:b])):
                deliver(i, text, a)
    return got


def sharded_generate(
    lm, requests: list[list], cache: GenerationCache | None, on_request=None
) -> list[list[str]]:
    """Generations of every document's requests; cached documents are reused, the others are
    generated round-robin across torch.distributed ranks and gathered on every rank.
    `on_request()` is called once per request done (cached ones included): progress."""
    from pyfast.eval.evaluator import _world

    keys = [request_key([list(r) for r in reqs]) for reqs in requests]
    out: list = [cache.get(d, keys[d]) if cache else None for d in range(len(requests))]
    pending = [d for d in range(len(requests)) if out[d] is None]
    rank, world = _world()
    mine = pending[rank::world]

    def on_doc(d: int, texts: list[str]) -> None:
        if cache is not None:
            cache.append(d, keys[d], texts)

    if on_request is not None:
        for d in range(len(requests)):
            for _ in requests[d] if out[d] is not None else ():
                on_request()
    todo = [(d, requests[d]) for d in mine]
    new = _generate_docs(lm, todo, on_doc, on_request) if mine else {}
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, new)
        new = {d: t for part in parts for d, t in part.items()}
    for d, texts in new.items():
        out[d] = texts
    return out


LL_CHUNK_REQUESTS = 256  # requests per log-likelihood chunk (whole documents)


def ll_chunks(doc_sizes: list[int], budget: int | None = None) -> list[tuple[int, int]]:
    """[first doc, end doc) ranges of consecutive documents with up to `budget` requests each
    (default :data:`LL_CHUNK_REQUESTS`; a larger document gets a chunk of its own); fixed by
    the sizes alone."""
    budget = budget or LL_CHUNK_REQUESTS
    out, start, n = [], 0, 0
    for d, size in enumerate(doc_sizes):
        if n and n + size > budget:
            out.append((start, d))
            start, n = d, 0
        n += size
    if start < len(doc_sizes):
        out.append((start, len(doc_sizes)))
    return out


class LoglikelihoodCache:
    """The log-likelihood cache file of one task in one run folder (see the module docstring)."""

    def __init__(self, path: Path, entries: dict[int, dict]):
        self.path, self.entries = path, entries

    @classmethod
    def for_task(cls, folder, task: str, lm, resume: bool) -> LoglikelihoodCache:
        from pyfast.eval.evaluator import _world

        folder = Path(folder)
        rank, world = _world()
        scoring = {k: getattr(lm, k, None) for k in ("max_length", "batch_size", "row_tokens")}
        header = {"task": task, "model": _model_id(lm), "scoring": scoring}
        name = f"loglikelihood_{task}.jsonl" if world == 1 else (
            f"loglikelihood_{task}.rank{rank}.jsonl")  # fmt: skip
        path = folder / name
        entries = GenerationCache._read(path, header, what="log-likelihoods", fields=(
            "chunk", "key", "answers")) if resume and path.is_file() else {}  # fmt: skip

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for line in [header, *entries.values()]:
                    f.write(json.dumps(line) + "\n")

        atomic_write(path, write)
        return cls(path, entries)

    def get(self, chunk: int, key: str) -> list[tuple[float, bool]] | None:
        e = self.entries.get(chunk)
        return [(float(a), bool(b)) for a, b in e["answers"]] if e and e["key"] == key else None

    def append(self, chunk: int, key: str, answers: list) -> None:
        row = {"chunk": chunk, "key": key, "answers": [[float(a), bool(b)] for a, b in answers]}
        self.entries[chunk] = row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
