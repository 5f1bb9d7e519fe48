"""Benchmark data: local JSONL (``<dir>/<data-name>/<split>.jsonl``) or the official HF dataset.

Every local file read is hashed (sha256) so results record exactly which bytes were evaluated.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pyfast.io import parse_jsonl


class DataStore:
    """Loads and caches splits; remembers the sha256 of every file it read.

    Args:
        data_dir: root of local JSONL files, or None for ``datasets.load_dataset``.
    """

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        if self.data_dir is not None and not self.data_dir.is_dir():
            raise FileNotFoundError(f"data directory not found: {self.data_dir}")
        self.hashes: dict[str, str] = {}
        self._cache: dict[tuple, list[dict]] = {}

    def load(self, data: dict, split: str, task: str) -> list[dict]:
        """Rows of `split` for the task's `data` spec; every row has data['fields'].

        Raises FileNotFoundError naming the expected path, ValueError naming file+line for
        malformed JSON or a missing field.
        """
        if self.data_dir is not None:
            rows, source = self._local(data["name"], split), None
            where = str(self.data_dir / data["name"] / f"{split}.jsonl")
        else:
            rows, source = self._hub(data, split, task), data["hf_path"]
            where = f"{source}/{data.get('hf_config') or ''}:{split}"
        for i, row in enumerate(rows):
            for field in data.get("fields", []):
                if field not in row:
                    raise ValueError(
                        f"{where}:{i + 1}: missing field {field!r} needed by task {task} "
                        f"(row has {', '.join(sorted(row)) or 'no fields'})"
                    )
        return rows

    def _local(self, name: str, split: str) -> list[dict]:
        path = self.data_dir / name / f"{split}.jsonl"
        key = ("local", str(path))
        if key in self._cache:
            return self._cache[key]
        if not path.is_file():
            raise FileNotFoundError(
                f"data file not found: {path} (expected <data-dir>/{name}/{split}.jsonl; "
                "use --split to pick another split)"
            )
        raw = path.read_bytes()
        self.hashes[str(path)] = hashlib.sha256(raw).hexdigest()
        rows = [row for _, row in parse_jsonl(raw.decode("utf-8"), path)]
        self._cache[key] = rows
        return rows

    def _hub(self, data: dict, split: str, task: str) -> list[dict]:
        key = ("hub", data["hf_path"], data.get("hf_config"), split)
        if key not in self._cache:
            import datasets

            try:
                ds = datasets.load_dataset(data["hf_path"], data.get("hf_config"), split=split)
            except Exception as exc:  # offline, unknown split, ...: one clear line for the user
                raise FileNotFoundError(
                    f"task {task}: cannot load {data['hf_path']} ({data.get('hf_config')}) "
                    f"split {split!r}: {type(exc).__name__}: {str(exc).splitlines()[0]} "
                    "(pass --data-dir for local files)"
                ) from None
            self._cache[key] = [dict(r) for r in ds]
        return self._cache[key]
