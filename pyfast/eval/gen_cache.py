"""Generation runs that survive interruption: per-document cache files and sharded generation.

``<output>/generations_<task>.jsonl`` (``.rank<r>.jsonl`` per rank under torchrun) starts with a
header line ``{"task", "model"}``; then one line per finished document
``{"doc_id", "key", "generations"}``, appended (flushed and fsynced) as soon as the document's
last request is generated. ``key`` is the sha256 of the document's requests (prompt and
generation kwargs), so a resumed run reuses only generations of unchanged requests. On start the
file is rewritten atomically: header only for a fresh run, header + the valid cached lines with
``--resume`` (a line torn by a crash at the end of the file is dropped).
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


def _model_id(lm) -> dict:
    ident = getattr(lm, "identity", None) or {"spec": type(lm).__name__}
    return {k: ident.get(k) for k in ("spec", "architecture", "parameters", "dtype", "sha256")
            if k in ident}  # fmt: skip


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
    def _read(path: Path, header: dict) -> dict[int, dict]:
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
                        f"{path}: cached generations were made for {row}, not {header}; "
                        "drop --resume or use another --output folder"
                    )
                continue
            if not (isinstance(row, dict) and {"doc_id", "key", "generations"} <= set(row)):
                raise ValueError(f"{path}:{lineno}: a cache line needs doc_id, key, generations")
            entries[int(row["doc_id"])] = row
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


def _generate_docs(lm, docs: list[tuple[int, list]], on_doc) -> dict[int, list[str]]:
    """Generates the requests of `docs` [(doc_id, requests)]; `on_doc(doc_id, texts)` runs as
    soon as a document's last request is done. Returns {doc_id: texts}."""
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


def sharded_generate(lm, requests: list[list], cache: GenerationCache | None) -> list[list[str]]:
    """Generations of every document's requests; cached documents are reused, the others are
    generated round-robin across torch.distributed ranks and gathered on every rank."""
    from pyfast.eval.evaluator import _world

    keys = [request_key([list(r) for r in reqs]) for reqs in requests]
    out: list = [cache.get(d, keys[d]) if cache else None for d in range(len(requests))]
    pending = [d for d in range(len(requests)) if out[d] is None]
    rank, world = _world()
    mine = pending[rank::world]

    def on_doc(d: int, texts: list[str]) -> None:
        if cache is not None:
            cache.append(d, keys[d], texts)

    new = _generate_docs(lm, [(d, requests[d]) for d in mine], on_doc) if mine else {}
    if world > 1:
        import torch.distributed as dist

        parts: list = [None] * world
        dist.all_gather_object(parts, new)
        new = {d: t for part in parts for d, t in part.items()}
    for d, texts in new.items():
        out[d] = texts
    return out
