"""The `pyfast` command line: one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _bench(sub):
    from pyfast.bench.report import SUITES

    p = sub.add_parser("bench", help="time pyfast's kernels against stock PyTorch, side by side")
    p.add_argument(
        "suite",
        nargs="?",
        default="all",
        choices=[*SUITES, "all"],
        help="which kernel family to run (default: all)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--output", default="results/bench", help="folder for results.json/.md/.png")
    p.add_argument(
        "--size",
        default="all",
        choices=["small", "smollm2-135m", "all"],
        help="optimizer parameter set (default: both)",
    )
    p.add_argument("--rounds", type=int, default=7, help="timed repetitions per provider")

    def run(args):
        from pyfast.bench.report import run_bench

        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        run_bench(args)

    p.set_defaults(func=run)


def _batch_size(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _eval(sub):
    p = sub.add_parser(
        "eval", help="score a model on benchmarks (lm-evaluation-harness compatible)"
    )
    p.add_argument(
        "--model",
        default="default",
        help="'default' (SmolLM2-135M), HF folder, LoRA adapter folder, .gguf or hub id; "
        "lm-eval's 'hf' with --model_args pretrained=...",
    )
    p.add_argument(
        "--model_args",
        "--model-args",
        default=None,
        help="lm-eval spelling: pretrained=MODEL[,dtype=...,max_length=N] (with --model hf)",
    )
    p.add_argument(
        "--tasks", required=True, help="comma-separated task/group names (pyfast ls tasks)"
    )
    p.add_argument(
        "--num-fewshot",
        "--num_fewshot",
        type=int,
        default=None,
        help="shots per prompt (default 0)",
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents")
    p.add_argument(
        "--batch-size",
        "--batch_size",
        type=_batch_size,
        default=16,
        help="requests per pass, or auto",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument(
        "--data-dir", "--data_dir", default=None, help="local <dir>/<data-name>/<split>.jsonl files"
    )
    p.add_argument(
        "--split",
        default=None,
        help="split to evaluate instead of each task's own: SPLIT and/or TASK=SPLIT, "
        "comma-separated (e.g. validation,hellaswag=train)",
    )
    p.add_argument(
        "--output", "--output_path", "--output-path", default=None,
        help="folder for results.json/.md/.png (+ samples, caches)",
    )  # fmt: skip
    p.add_argument(
        "--log-samples", "--log_samples", action="store_true", help="write samples_<task>.jsonl"
    )
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (default 1234)")
    p.add_argument(
        "--apply-chat-template",
        "--apply_chat_template",
        action="store_true",
        help="generation tasks: render prompts with the model's chat template, few-shot "
        "examples as turns",
    )
    p.add_argument(
        "--gen-kwargs",
        "--gen_kwargs",
        default=None,
        help="override generation settings: KEY=VALUE,... with temperature, top_p, top_k, "
        "max_gen_toks, do_sample, seed",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the generations and log-likelihoods cached in --output by an interrupted "
        "run (same model and settings): the same results as an uninterrupted run",
    )
    p.add_argument(
        "--pack-weights",
        choices=["auto", "on", "off"],
        default="auto",
        help="run float32 CPU linear layers on oneDNN-packed weight copies (faster, one more "
        "copy of those weights in memory); auto: where oneDNN serves and they fit in half the "
        "available memory (default auto)",
    )

    from pyfast.eval.bench_tasks import add_arguments

    add_arguments(p)  # humaneval / mt_bench options

    def run(args):
        from pyfast.eval import evaluate
        from pyfast.eval.bench_tasks import options_from_args
        from pyfast.eval.registry import expand
        from pyfast.eval.report import check_output_dir, markdown_table, write_run
        from pyfast.models import resolve_model

        _lm_eval_model_args(args)
        if args.output:  # a file in the way or no permission: fail before any work
            check_output_dir(args.output)
        expand(args.tasks.split(","))  # unknown task names fail before the model loads
        if args.model != "default":
            resolve_model(args.model)
        if args.log_samples and not args.output:
            raise ValueError("--log-samples needs --output DIR")
        if args.resume and not args.output:
            raise ValueError("--resume needs --output DIR (the folder of the interrupted run)")
        if args.gen_kwargs:
            from pyfast.eval.generation import parse_gen_kwargs

            parse_gen_kwargs(args.gen_kwargs)  # bad settings fail before the model loads
        try:
            _run_eval(args, evaluate, options_from_args, markdown_table, write_run)
        except OSError as exc:  # a full disk, a folder gone: one line, what was done is kept
            if isinstance(exc, FileNotFoundError):
                raise
            raise ValueError(f"{exc.strerror or exc}: {exc.filename or ''}") from None

    p.set_defaults(func=run)


def _lm_eval_model_args(args) -> None:
    """lm-eval's ``--model hf --model_args pretrained=X,dtype=Y,max_length=N`` onto pyfast's
    --model / --dtype / max_length; other keys are refused (one line naming them)."""
    args.max_length = None
    if args.model_args is None:
        if args.model in ("hf", "huggingface"):
            raise ValueError(f"--model {args.model} needs --model_args pretrained=MODEL")
        return
    if args.model not in ("default", "hf", "huggingface"):
        raise ValueError(
            f"--model_args goes with lm-eval's --model hf, not --model {args.model}; "
            "give the model as --model PATH or --model_args pretrained=PATH"
        )
    kw = {}
    for part in args.model_args.split(","):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not (sep and key and value):
            raise ValueError(f"--model_args entry {part!r} must be KEY=VALUE")
        kw[key] = value
    unknown = sorted(set(kw) - {"pretrained", "dtype", "max_length"})
    if unknown:
        raise ValueError(
            f"--model_args: unsupported key(s) {', '.join(unknown)}; pyfast maps pretrained, "
            "dtype and max_length (use pyfast's own flags for the rest)"
        )
    if "pretrained" not in kw:
        raise ValueError("--model_args needs pretrained=MODEL")
    args.model = kw["pretrained"]
    if "dtype" in kw:
        args.dtype = {"auto": "float32"}.get(kw["dtype"], kw["dtype"])
    if "max_length" in kw:
        try:
            args.max_length = int(kw["max_length"])
        except ValueError:
            raise ValueError(
                f"--model_args max_length must be an integer: {kw['max_length']!r}"
            ) from None
        if args.max_length < 2:
            raise ValueError(f"--model_args max_length must be >= 2, got {args.max_length}")


def _run_eval(args, evaluate, options_from_args, markdown_table, write_run) -> None:
    """evaluate() with the parsed arguments; prints the table, writes the run folder."""
    out = evaluate(
        args.model,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        data_dir=args.data_dir,
        split=args.split,
        seed=args.seed,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs,
        output=args.output,
        resume=args.resume,
        task_options=options_from_args(args),
        pack_weights={"auto": None, "on": True, "off": False}[args.pack_weights],
        max_length=args.max_length,
        progress=True,
    )
    if out["config"]["world_size"] > 1:
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return  # rank 0 reports and writes; every rank holds the same results
    print(markdown_table(out))
    if args.output:
        write_run(out, args.output, samples=False)  # evaluate wrote the samples
        print(f"\nwritten to {args.output}/results.json")


def _ls(sub):
    p = sub.add_parser("ls", help="list what pyfast knows: tasks")
    p.add_argument("what", choices=["tasks"], help="what to list")

    def run(args):
        from pyfast.eval.registry import _registry

        tasks, groups = _registry()
        for name in sorted(groups):
            more = ", ..." if len(groups[name]) > 4 else ""
            print(f"{name}  (group of {len(groups[name])}: {', '.join(groups[name][:4])}{more})")
        for name in sorted(tasks):
            t = tasks[name]
            print(f"{name}  ({t.data['hf_path']}, {t.data['split']}; {', '.join(t.metrics)})")

    p.set_defaults(func=run)


def _recipe_args(p, example: str) -> None:
    """The arguments every config-driven recipe takes (pyfast train, pyfast align)."""
    p.add_argument("--config", default=None, help="YAML config file (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides (e.g. {example})")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue the run in output_dir from a checkpoint folder (default: its newest); "
        "only max_steps, epochs and other run-length keys may change (docs/runs.md)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="output_dir holds another run: move it aside to <output_dir>.old-<time> first",
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config, exit")


def _run_recipe(args, load_config, recipe_cls):
    """(config, summary) of a recipe run; summary None for --print-config and on ranks > 0."""
    import yaml

    from pyfast.train import TrainingStopped
    from pyfast.train.config import to_dict

    if args.resume and "=" in args.resume and not Path(args.resume).exists():
        # `--resume max_steps=8`: argparse took the override for --resume's optional folder;
        # it was typed after the other overrides, so it comes last (wins over an earlier one)
        args.overrides.append(args.resume)
        args.resume = "latest"
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return cfg, None
    try:
        summary = recipe_cls(cfg, resume=args.resume, overwrite=args.overwrite).run()
    except TrainingStopped as exc:
        raise ValueError(str(exc)) from None
    return cfg, summary if os.environ.get("RANK", "0") == "0" else None


def _train(sub):
    p = sub.add_parser(
        "train",
        help="fine-tune a model: full fine-tuning or transfer learning, from a YAML config",
        description="Fine-tune from a YAML config (see configs/); key=value overrides, e.g. "
        "optim.lr=1e-4 freeze.top_blocks=2. Runs data-parallel under torchrun.",
    )
    _recipe_args(p, "max_steps=100")

    def run(args):
        from pyfast.train import Recipe, load_config

        cfg, summary = _run_recipe(args, load_config, Recipe)
        if summary is not None:
            print(
                f"done: {summary['steps']} steps, final train loss {summary['final_loss']:.4f}, "
                f"{summary['tokens_per_s']:.0f} tokens/s; {summary['stop_reason']}"
                f"{_saved_where(cfg)}"
            )

    p.set_defaults(func=run)


def _saved_where(cfg) -> str:
    """Where the run left its model, for the closing line."""
    out = Path(cfg.output_dir)
    if cfg.save_final and (out / "final").is_dir():
        return f"; model in {out / 'final'}"
    if (out / "best").is_dir():
        return f"; best model in {out / 'best'} (save_final=false)"
    return "; no model saved (save_final=false)"


def _align(sub):
    p = sub.add_parser(
        "align",
        help="align a model on preference pairs: DPO (sigmoid/ipo/hinge), SimPO, ORPO, reward",
        description="Preference alignment from a YAML config (see configs/align/); "
        "key=value overrides, e.g. align.method=simpo align.beta=2. Same loop, checkpoints and "
        "--resume as pyfast train.",
    )
    _recipe_args(p, "align.beta=0.2")

    def run(args):
        from pyfast.align.config import load_config
        from pyfast.align.recipe import AlignRecipe

        cfg, summary = _run_recipe(args, load_config, AlignRecipe)
        if summary is None:
            return
        print(
            f"done: {summary['steps']} steps ({cfg.align.method}), final train loss "
            f"{summary['final_loss']:.4f}; {summary['stop_reason']}{_saved_where(cfg)}"
        )
        held = summary.get("heldout")
        if held:
            b, a = held["before"], held["after"]
            print(
                f"held-out preference accuracy: {b['eval_preference_accuracy']:.3f} (step "
                f"{b['step']}) -> {a['eval_preference_accuracy']:.3f} (step {a['step']}); "
                f"rewards/accuracies {b['eval_rewards/accuracies']:.3f} -> "
                f"{a['eval_rewards/accuracies']:.3f}"
            )

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    from pyfast import __version__, extension_info

    ext = extension_info()
    kernels = (
        f"_C {ext['cpu_capability']}" + (" + CUDA" if ext["cuda_kernels"] else "")
        if ext["compiled"]
        else "reference ops (no _C)"
    )
    parser = argparse.ArgumentParser(
        prog="pyfast", description="Fine-tune, align and evaluate bespoke LLMs on fused kernels."
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"pyfast {__version__} (torch {ext['torch']}, {kernels})",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _bench(sub)
    _eval(sub)
    _ls(sub)
    _train(sub)
    _align(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        print(f"pyfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyfast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
