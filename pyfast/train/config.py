"""Typed training configuration: dataclasses, YAML files and ``key=value`` overrides.

A config is a tree of dataclasses (:class:`TrainConfig` at the root). YAML files and command-line
overrides (``optim.lr=1e-4``, ``freeze.top_blocks=2``) are checked against the field types: an
unknown key or a value of the wrong type raises ``ValueError`` naming the full key and, for unknown
keys, the closest known one (difflib). Recipes that need more options subclass a section (or the
root) and pass their root class to :func:`load_config`; the checks follow the new fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


@dataclass
class ModelConfig:
    """What to fine-tune: 'default' (embedded SmolLM2-135M-Instruct), a HF folder or a .gguf."""

    name: str = "default"
    dtype: str = "float32"  # weights' dtype: float32 | bfloat16
    chat_template: bool = True  # apply the tokenizer's chat template when it has one
    gradient_checkpointing: bool = False
    # RMSNorm and SwiGLU MLP through pyfast's fused ops (Llama-family models; same results, less
    # activation memory): see pyfast.ops.fused_blocks
    fused_blocks: bool = True
    # with fused_blocks: the MLPs keep only their input for backward and recompute gate(x) and
    # up(x) there (two (tokens, intermediate) tensors per layer fewer, two more matmuls)
    recompute_mlp: bool = False
    # run each micro-batch of the SFT loss as one unpadded row: every row cut after its last
    # target, attention kept within rows (models on transformers' "sdpa" attention without
    # sliding windows; others run the padded batch). Same loss, fewer tokens.
    padding_free: bool = True
    # float32 CPU linear layers on oneDNN-packed copies of their weights wherever nothing needs
    # their gradient: the frozen blocks below the trainable ones, held-out losses, benchmark
    # scoring, DPO's reference pass (pyfast.ops.packed_linear; only where the copies fit in half
    # the available memory). false: torch's F.linear everywhere, no copies.
    pack_weights: bool = True


@dataclass
class DataConfig:
    """Training and held-out data.

    path: a local ``.jsonl`` file, or a Hugging Face dataset id (``hf:NAME`` or ``NAME``, loaded
    with ``datasets.load_dataset(NAME, hf_config, split=split)``); a list of paths concatenates.
    format: auto | instruction (instruction/input/output) | prompt_completion | chat (messages)
    | text | arc | gsm8k (benchmark training splits turned into prompt/completion pairs).
    """

    path: list[str] = field(default_factory=list)
    hf_config: str | None = None
    split: str = "train"
    format: Literal["auto", "instruction", "prompt_completion", "chat", "text", "arc", "gsm8k"] = (
        "auto"
    )
    eval_path: list[str] = field(default_factory=list)  # separate held-out file(s)
    eval_fraction: float = 0.0  # else: this fraction of the training rows is held out
    eval_max_rows: int | None = None
    max_rows: int | None = None  # use only the first N training rows
    max_length: int = 512  # longer examples are truncated (and counted)
    completion_only: bool = True  # loss on completion tokens only (-100 on the prompt)
    packing: bool = False  # concatenate examples into max_length blocks
    add_eos: bool = True  # end every completion with the tokenizer's EOS token
    shuffle: bool = True


@dataclass
class LoraConfig:
    """LoRA adapters through the PEFT library (``freeze.lora.enabled=true``)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    merge: bool = False  # save the merged full model instead of the adapter


@dataclass
class FreezeConfig:
    """Transfer learning as a freezing policy; every field selects parameters to TRAIN.

    ``full=true`` trains everything. Otherwise the union of: the top ``top_blocks`` decoder blocks,
    the final norm (``norm``), the output head (``head``; tied to the input embeddings in many
    models, which then train too), parameters whose name matches one of ``patterns`` (fnmatch
    globs, e.g. ``*.mlp.*``), rows ``embedding_rows`` of the input embedding (per-row masks: e.g.
    new tokens), LoRA adapters, and a new head.
    """

    full: bool = True
    top_blocks: int = 0
    norm: bool = False
    head: bool = False
    patterns: list[str] = field(default_factory=list)
    embedding_rows: list[int] = field(default_factory=list)
    lora: LoraConfig = field(default_factory=LoraConfig)
    new_head: Literal["none", "scalar"] = "none"  # 'scalar': a fresh Linear(hidden, 1) head


@dataclass
class OptimConfig:
    """FusedAdamW (default) or torch.optim.AdamW ('torch', with grad_mask_ for masked rows)."""

    name: Literal["fused_adamw", "torch_adamw"] = "fused_adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    # update each parameter inside backward and free its gradient at once (less peak memory);
    # needs fused_adamw, max_grad_norm: null, grad_accum 1 and one process
    update_in_backward: bool = False
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """Held-out evaluation every ``every`` optimizer steps (0: only at the end)."""

    every: int = 0
    batch_size: int = 8
    tasks: str = ""  # benchmark tasks through pyfast.eval (e.g. "arc_easy"), "" = none
    tasks_data_dir: str | None = None
    tasks_split: str | None = None
    tasks_limit: int | None = None
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    early_stopping_min_delta: float = 0.0


@dataclass
class TrainConfig:
    """Root of a training config (see configs/*.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/train"
    seed: int = 0
    batch_size: int = 8  # global batch per optimizer step = batch_size * grad_accum (* ranks)
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    precision: Literal["float32", "bf16"] = "float32"  # bf16: autocast of the forward
    log_every: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only best/final)
    keep_checkpoints: int = 2
    save_final: bool = True
    progress: bool = True
    device: str = "cpu"
    threads: int = 0  # torch.set_num_threads (0: leave torch's default)
    # CPU (glibc): hand freed heap memory back to the OS after each forward and every N decoder
    # blocks of backward — a lower resident peak for some step time (pyfast.heap); 0: off
    trim_heap_every: int = 0
    # under torchrun (WORLD_SIZE > 1): auto = ddp (replicas), fsdp = sharded (fully_shard)
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"


# -- checking ------------------------------------------------------------------------------------


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Returns `value` as type `tp` or raises ValueError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"config key {key}: {value!r} is not one of {', '.join(map(repr, args))}{hint}"
            )
        return value
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise ValueError(f"config key {key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(
                f"config key {key}: expected a mapping of {tp.__name__} fields, "
                f"got {type(value).__name__}"
            )
        return build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key {key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key {key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"config key {key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"config key {key}: expected a string, got {value!r}")
    raise ValueError(f"config key {key}: unsupported field type {_type_name(tp)}")


def _unknown_key(cls, key: str, prefix: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return ValueError(
        f"unknown config key {prefix}{key}{hint} (known in {prefix or 'the root'}: "
        f"{', '.join(names)})"
    )


def build(cls, values: dict, prefix: str = ""):
    """Builds dataclass `cls` from a (nested) dict, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key(cls, str(key), prefix)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    """The config as plain nested dicts (what checkpoints store as the resolved config)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str], cls) -> dict:
    """Sets each ``a.b.c=value`` (value parsed as YAML) into nested dict `values`."""
    for item in overrides:
        path, value = _parse_override(item)
        node, tp, prefix = values, cls, ""
        for i, part in enumerate(path):
            if not dataclasses.is_dataclass(tp):
                raise ValueError(f"config key {prefix.rstrip('.')} has no sub-keys ({item!r})")
            names = {f.name for f in dataclasses.fields(tp)}
            if part not in names:
                raise _unknown_key(tp, part, prefix)
            if i == len(path) - 1:
                node[part] = value
            else:
                tp = typing.get_type_hints(tp)[part]
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ValueError(f"config key {prefix}{part} is not a section")
                prefix += part + "."
    return values


# Keys of a config file that name local files or folders to read: relative values resolve
# against the config file's folder (values given as key=value overrides stay relative to the
# working directory, like any command-line path).
CONFIG_PATH_KEYS = (("model", "name"), ("data", "path"), ("data", "eval_path"),
                    ("eval", "tasks_data_dir"))  # fmt: skip


def _resolve_one(value, base: Path, must_be_file: bool):
    if not isinstance(value, str) or not value or value == "default" or value.startswith("hf:"):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    candidate = base / p
    if candidate.exists():
        return os.path.normpath(candidate)
    if must_be_file and value.endswith(".jsonl") and not p.exists():
        return os.path.normpath(candidate)  # the file the config means: its error names it
    return value  # a dataset / hub id, or a path that exists relative to the working directory


def resolve_config_paths(values: dict, base: Path) -> dict:
    """`values` (a config file's mapping) with the relative paths of :data:`CONFIG_PATH_KEYS`
    resolved against `base`, the config file's folder. A value is rewritten where that path
    exists (or, for a ``.jsonl`` data file, where nothing of that name exists relative to the
    working directory either); dataset ids, ``hf:`` sources and 'default' stay as they are, and
    so does a relative path that exists only relative to the working directory (configs written
    before this rule keep working when run from their old place)."""
    for section, key in CONFIG_PATH_KEYS:
        node = values.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        value, data = node[key], section == "data"
        if isinstance(value, list):
            node[key] = [_resolve_one(v, base, data) for v in value]
        else:
            node[key] = _resolve_one(value, base, data)
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, cls=None):
    """Loads YAML file `path` (optional) plus ``key=value`` overrides into `cls` (TrainConfig).

    Relative data paths in the file resolve against the file's folder
    (:func:`resolve_config_paths`); those in `overrides` against the working directory.

    Raises:
        FileNotFoundError: the config file is missing.
        ValueError: malformed YAML, an unknown key (with a suggestion) or a wrong type.
    """
    cls = cls or TrainConfig
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: malformed YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        values = resolve_config_paths(loaded or {}, path.parent)
    values = apply_overrides(values, list(overrides or []), cls)
    try:
        cfg = build(cls, values)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}" if path is not None else str(exc)) from None
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Range checks that types alone do not express."""
    checks = [
        (cfg.batch_size >= 1, "batch_size must be >= 1"),
        (cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (cfg.max_steps >= 0, "max_steps must be >= 0"),
        (cfg.max_steps > 0 or cfg.epochs > 0, "set epochs > 0 or max_steps > 0"),
        (cfg.data.max_length >= 2, "data.max_length must be >= 2"),
        (0.0 <= cfg.data.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (cfg.optim.lr >= 0, "optim.lr must be >= 0"),
        (0.0 <= cfg.optim.warmup_ratio < 1.0, "optim.warmup_ratio must be in [0, 1)"),
        (cfg.optim.warmup_steps >= 0, "optim.warmup_steps must be >= 0"),
        (cfg.freeze.top_blocks >= 0, "freeze.top_blocks must be >= 0"),
        (cfg.eval.every >= 0, "eval.every must be >= 0"),
        (cfg.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
        (cfg.trim_heap_every >= 0, "trim_heap_every must be >= 0"),
        (
            cfg.trim_heap_every == 0 or cfg.device == "cpu",
            "trim_heap_every applies to CPU training (it trims the C library's heap)",
        ),
        (
            cfg.model.fused_blocks or not cfg.model.recompute_mlp,
            "model.recompute_mlp needs model.fused_blocks: true (it is a mode of the fused MLP)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if cfg.distributed == "fsdp":
        refused = [
            (cfg.freeze.embedding_rows and cfg.optim.name != "fused_adamw", "freeze."
             "embedding_rows with optim.name=torch_adamw (per-row masks of a sharded embedding "
             "are applied by optim.name=fused_adamw)"),
            (cfg.freeze.lora.merge, "freeze.lora.merge (the adapters are saved unmerged; merge "
             "the saved adapter afterwards)"),
            (cfg.eval.tasks, "eval.tasks (benchmark scoring splits documents unevenly over "
             "the ranks; score final/ or best/ with pyfast eval)"),
        ]  # fmt: skip
        for bad, what in refused:
            if bad:
                raise ValueError(f"distributed=fsdp does not support {what}")
