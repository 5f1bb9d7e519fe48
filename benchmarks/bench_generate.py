"""pyfast generate_until vs lm-eval's HF backend: new tokens/s on the same GSM8K prompts.

    pip install lm-eval==0.4.13
    HF_HUB_OFFLINE=1 python benchmarks/bench_generate.py [--data-dir ../shared/benchmarks]
        [--docs 16] [--batch-size 8] [--max-gen-toks 256] [--output results/bench_generate]

Both sides get the same model (the embedded SmolLM2-135M-Instruct, float32, from the same
safetensors folder), the same requests (5-shot GSM8K prompts of the first ``--docs`` rows of
``gsm8k/train.jsonl``, few-shot examples from the same file, built by pyfast's gsm8k task, which
tests/eval/test_fidelity.py checks equal lm-eval's; lm-eval's gsm8k generation kwargs: greedy,
stop at "Question:", "</s>", "<|im_end|>") and the same batch size. Each side first generates one
short warm-up request, then the timed set once, lm-eval first. "New tokens" are the tokens of
the returned generations (re-encoded with the model's tokenizer), counted the same way for both
sides, so the tokens/s ratio is the inverse time ratio on the same work; the table also reports
how many generations are identical.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def _requests(data_dir: str, docs: int, max_gen_toks: int):
    from pyfast.eval.data import DataStore
    from pyfast.eval.registry import get_task

    task = get_task("gsm8k")
    store = DataStore(data_dir)
    pool = task.docs(store, "train")
    rows = pool[:docs]
    ctxs = task.contexts(rows, pool, task.num_fewshot, 1234, same_split=True)
    kw = {**task.generation_kwargs, "max_gen_toks": max_gen_toks}
    return [(c, dict(kw)) for c in ctxs]


def _lm_eval_generate(lm, reqs):
    from lm_eval.api.instance import Instance

    inst = [
        Instance(request_type="generate_until", doc={}, arguments=(c, dict(k)), idx=i)
        for i, (c, k) in enumerate(reqs)
    ]
    return lm.generate_until(inst, disable_tqdm=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "shared/benchmarks"))
    p.add_argument("--docs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-gen-toks", type=int, default=256)
    p.add_argument("--output", default="results/bench_generate")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from lm_eval.models.huggingface import HFLM as LmEvalHFLM

    from pyfast.eval import HFLM
    from pyfast.io import write_json, write_text
    from pyfast.models import default_model_folder

    folder = str(default_model_folder())
    ours = HFLM(folder, batch_size=args.batch_size)
    theirs = LmEvalHFLM(pretrained=folder, dtype="float32", batch_size=args.batch_size,
                        device="cpu")  # fmt: skip
    warm = [("Question: What is 2 + 3?\nAnswer:", {"until": ["\n"], "max_gen_toks": 4})]
    _lm_eval_generate(theirs, warm)
    ours.generate_until(warm)
    reqs = _requests(args.data_dir, args.docs, args.max_gen_toks)

    start = time.perf_counter()
    ref = _lm_eval_generate(theirs, reqs)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    got = ours.generate_until(reqs)
    t_got = time.perf_counter() - start

    tok = ours.tokenizer

    def n_tokens(texts):
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)

    n_ref, n_got = n_tokens(ref), n_tokens(got)
    prompt_toks = sum(len(tok(c)["input_ids"]) for c, _ in reqs)
    same = sum(a == b for a, b in zip(got, ref, strict=True))
    row = {
        "docs": len(reqs),
        "batch_size": args.batch_size,
        "prompt_tokens": prompt_toks,
        "lm_eval_new_tokens": n_ref,
        "pyfast_new_tokens": n_got,
        "lm_eval_s": round(t_ref, 2),
        "pyfast_s": round(t_got, 2),
        "lm_eval_tok_s": round(n_ref / t_ref, 2),
        "pyfast_tok_s": round(n_got / t_got, 2),
        "speedup": round((n_got / t_got) / (n_ref / t_ref), 2),
        "identical_generations": f"{same}/{len(reqs)}",
    }
    print(row, flush=True)
    table = "\n".join(
        [
            "| docs | batch | prompt tokens | new tokens | lm-eval s | pyfast s | lm-eval tok/s "
            "| pyfast tok/s | speedup | identical |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {row['docs']} | {row['batch_size']} | {prompt_toks} | {n_got} | "
            f"{row['lm_eval_s']} | {row['pyfast_s']} | {row['lm_eval_tok_s']} | "
            f"{row['pyfast_tok_s']} | {row['speedup']}x | {row['identical_generations']} |",
        ]
    )
    print(table)
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": folder,
        "max_gen_toks": args.max_gen_toks,
    }
    write_json(Path(args.output) / "results.json", {"meta": meta, "rows": [row],
               "generations": {"pyfast": got, "lm_eval": ref}})  # fmt: skip
    write_text(Path(args.output) / "results.md", table + "\n")


if __name__ == "__main__":
    main()
