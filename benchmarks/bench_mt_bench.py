"""MT-Bench answering: pyfast (one continuous batch for every category) vs a plain transformers
``generate`` loop answering one question at a time, as FastChat's ``gen_model_answer.py`` does.

    HF_HUB_OFFLINE=1 python benchmarks/bench_mt_bench.py [--data-dir tests/data/benchmarks]
        [--questions 8] [--max-new-tokens 64] [--batch-size 8] [--output results/bench_mt_bench]

Both sides get the same model (the embedded SmolLM2-135M-Instruct, float32, from the same
safetensors folder), the same questions (``<data-dir>/mt_bench/question.jsonl``, both turns, the
first answer part of the second turn's conversation), the same chat template and FastChat's
temperatures per category (0.7 writing/roleplay, 0.1 stem/humanities, greedy otherwise), and the
same max new tokens; each generation stops at EOS. The baseline is FastChat's loop: per question,
per turn, ``model.generate(input_ids, do_sample=temperature >= 1e-4, temperature=...,
max_new_tokens=...)`` on the plain transformers model, the answer decoded without special tokens
and stripped. pyfast runs :func:`pyfast.eval.mt_bench.generate_answers` on
:class:`pyfast.eval.HFLM`. New tokens are counted the same way for both sides (the answers
re-encoded), so the tokens/s ratio is the inverse time ratio on the same work; the greedy
categories' answers (both turns) must be identical. Each side first answers one warm-up turn.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch


def _fastchat_loop(model, tok, questions, max_new_tokens):
    """FastChat gen_model_answer's loop, one question (and turn) at a time."""
    from pyfast.eval.mt_bench import TEMPERATURE

    out = {}
    for q in questions:
        temperature = TEMPERATURE[q["category"]]
        torch.manual_seed(0)
        conv, answers = [], []
        for turn in q["turns"]:
            conv.append({"role": "user", "content": turn})
            prompt = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            input_ids = tok([prompt], add_special_tokens=False).input_ids
            do_sample = temperature >= 1e-4
            with torch.inference_mode():
                output_ids = model.generate(
                    torch.as_tensor(input_ids),
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=None,
                    top_k=None,
                    max_new_tokens=max_new_tokens,
                )
            text = tok.decode(output_ids[0][len(input_ids[0]) :], skip_special_tokens=True)
            answers.append(text.strip())
            conv.append({"role": "assistant", "content": answers[-1]})
        out[q["question_id"]] = answers
    return out


class _Memory:
    """An in-memory answer cache for mt_bench.generate_answers."""

    def __init__(self):
        self.rows = {}

    def get(self, key):
        return self.rows.get(key)

    def put_many(self, rows):
        self.rows.update({r["key"]: r for r in rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=str(Path(__file__).parents[1] / "tests/data/benchmarks"))
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output", default="results/bench_mt_bench")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyfast.eval import HFLM, mt_bench
    from pyfast.eval.data import DataStore
    from pyfast.io import write_json, write_text
    from pyfast.models import default_model_folder

    folder = str(default_model_folder())
    questions = mt_bench.load(DataStore(args.data_dir))[0][: args.questions]
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ours = HFLM(folder, batch_size=args.batch_size)
    warm = [{"question_id": 0, "category": "math", "turns": ["What is 2 + 3?", "And 4 + 4?"]}]
    _fastchat_loop(plain, tok, warm, 4)
    mt_bench.generate_answers(ours, warm, _Memory(), max_new_tokens=4, seed=1)

    start = time.perf_counter()
    ref = _fastchat_loop(plain, tok, questions, args.max_new_tokens)
    t_ref = time.perf_counter() - start
    start = time.perf_counter()
    got = mt_bench.generate_answers(
        ours, questions, _Memory(), max_new_tokens=args.max_new_tokens, seed=1234
    )
    t_got = time.perf_counter() - start

    def n_tokens(answers):
        return sum(len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers)

    n_ref = n_tokens(a for v in ref.values() for a in v)
    n_got = n_tokens(a for v in got.values() for a in v)
    greedy = [q["question_id"] for q in questions if mt_bench.TEMPERATURE[q["category"]] < 1e-4]
    same = sum(got[i] == ref[i] for i in greedy)
    row = {
        "questions": len(questions),
        "turns": 2 * len(questions),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "fastchat_loop_new_tokens": n_ref,
        "pyfast_new_tokens": n_got,
        "fastchat_loop_s": round(t_ref, 2),
        "pyfast_s": round(t_got, 2),
        "fastchat_loop_tok_s": round(n_ref / t_ref, 2),
        "pyfast_tok_s": round(n_got / t_got, 2),
        "speedup": round((n_got / t_got) / (n_ref / t_ref), 2),
        "identical_greedy_questions": f"{same}/{len(greedy)}",
    }
    print(row, flush=True)
    table = "\n".join(
        [
            "| questions x turns | max new | batch | new tokens (loop / pyfast) | loop s "
            "| pyfast s "
            "| loop tok/s | pyfast tok/s | speedup | greedy identical |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {len(questions)} x 2 | {args.max_new_tokens} | {args.batch_size} | {n_ref} / "
            f"{n_got} | {row['fastchat_loop_s']} | {row['pyfast_s']} | "
            f"{row['fastchat_loop_tok_s']} | {row['pyfast_tok_s']} | {row['speedup']}x | "
            f"{row['identical_greedy_questions']} |",
        ]
    )
    print(table)
    meta = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "model": folder,
        "linear_weights": ours.identity.get("linear_weights"),
    }
    answers = {"pyfast": got, "fastchat_loop": ref}
    write_json(Path(args.output) / "results.json", {"meta": meta, "rows": [row], **answers})
    write_text(Path(args.output) / "results.md", table + "\n")


if __name__ == "__main__":
    main()
