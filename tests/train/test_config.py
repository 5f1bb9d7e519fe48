"""Typed configs: YAML + key=value overrides, errors naming the key with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyfast.train.config import LoraConfig, TrainConfig, load_config

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert CONFIGS, "no configs/*.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_starts_with_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and f"--config configs/{path.name}" in first, first


def test_overrides_set_nested_typed_values():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-4",
            "freeze.top_blocks=2",
            "data.path=a.jsonl",
            "freeze.lora.target_modules=[q_proj,k_proj]",
            "epochs=2",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.freeze.top_blocks == 2
    assert cfg.data.path == ["a.jsonl"]  # a single value where a list is expected
    assert cfg.freeze.lora.target_modules == ["q_proj", "k_proj"]
    assert isinstance(cfg.freeze.lora, LoraConfig)
    assert cfg.epochs == 2.0


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown config key optim\.lrr; did you mean optim\.lr\?"
    ):
        load_config(None, ["optim.lrr=1"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  warmup_stpes: 3\n", encoding="utf-8")
    with pytest.raises(
        ValueError,
        match=r"bad\.yaml: unknown config key optim\.warmup_stpes; "
        r"did you mean optim\.warmup_steps\?",
    ):
        load_config(bad)


@pytest.mark.parametrize(
    "override, message",
    [
        ("batch_size=abc", r"config key batch_size: expected an integer, got 'abc'"),
        ("batch_size=1.5", r"config key batch_size: expected an integer"),
        ("optim.lr=fast", r"config key optim\.lr: expected a number"),
        ("progress=maybe", r"config key progress: expected true or false"),
        ("optim.schedule=cosin", r"optim\.schedule: 'cosin' is not one of .*did you mean 'cosine'"),
        ("optim=3", r"config key optim: expected a mapping"),
        ("seed", r"not key=value"),
        ("batch_size=0", r"batch_size must be >= 1"),
    ],
)
def test_wrong_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_recompute_mlp_needs_the_fused_blocks():
    assert load_config(None, ["model.recompute_mlp=true"]).model.recompute_mlp
    with pytest.raises(ValueError, match="model.recompute_mlp needs model.fused_blocks"):
        load_config(None, ["model.fused_blocks=false", "model.recompute_mlp=true"])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config("nope.yaml")


ALIGN_CONFIGS = sorted((Path(__file__).parents[2] / "configs" / "align").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS + ALIGN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_find_their_data_from_any_directory(path, tmp_path, monkeypatch):
    from pyfast.align.config import load_config as load_align

    monkeypatch.chdir(tmp_path)  # not the repository root
    cfg = (load_align if path.parent.name == "align" else load_config)(path)
    assert cfg.data.path and all(Path(p).is_file() for p in cfg.data.path), cfg.data.path


def test_config_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "proj" / "bench").mkdir()
    conf = tmp_path / "proj" / "conf.yaml"
    conf.write_text(
        "data:\n  path: [data/a.jsonl, hf:org/set, org/set]\n  eval_path: data/missing.jsonl\n"
        "eval:\n  tasks_data_dir: bench\nmodel:\n  name: default\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "proj" / "conf.yaml")  # a relative --config
    proj = Path("..") / "proj"
    assert cfg.data.path == [str(proj / "data" / "a.jsonl"), "hf:org/set", "org/set"]
    assert cfg.data.eval_path == [str(proj / "data" / "missing.jsonl")]  # its error names it
    assert cfg.eval.tasks_data_dir == str(proj / "bench") and cfg.model.name == "default"
    # the command line's paths stay relative to the working directory
    assert load_config(conf).data.path[0] == str(tmp_path / "proj" / "data" / "a.jsonl")
    cfg = load_config(conf, ["data.path=data/a.jsonl"])
    assert cfg.data.path == ["data/a.jsonl"]
    # a config written for the working directory (the old rule) keeps working there
    (elsewhere / "old.jsonl").write_text("{}\n")
    conf.write_text("data:\n  path: old.jsonl\n")
    assert load_config(conf).data.path == ["old.jsonl"]
