"""What the generative (WILD) metric's greedy answers cost per CounterFact case on the default model, three
ways: each case alone with every row kept to the end (the plain path), each case alone with finished
answers leaving the batch, and several cases' prompts in shared batches (what a run does wherever one model
state scores many cases). Also how many answers the fast ways give identically to the plain one.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_answers.py [--n 20] [--start 0] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import machine

from factedit import load_model
from factedit.data import load_dataset
from factedit.evaluation.cases import GenerativeSettings, answer_slices, generative_prompts, prefetch_answers
from factedit.evaluation.generation import greedy_answers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=64, help="rows of a shared batch (the runs' batch_size)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    model, tok = load_model()
    cases = load_dataset("counterfact", n=args.n, start=args.start).cases
    settings = GenerativeSettings()
    prompts = {c.case_id: generative_prompts(c) for c in cases}

    def each(compact: bool) -> tuple[float, dict[str, object]]:
        started, answers = time.perf_counter(), {}
        for case in cases:
            got = greedy_answers(model, tok, prompts[case.case_id], max_new_tokens=50, compact=compact)
            answers.update(zip(prompts[case.case_id], got))
        return time.perf_counter() - started, answers

    plain_s, plain = each(False)
    compact_s, compact = each(True)
    started, shared = time.perf_counter(), {}
    for chunk in answer_slices(cases, args.rows):
        shared.update(prefetch_answers(model, tok, chunk, settings, batch_size=args.rows))
    shared_s = time.perf_counter() - started
    n = len(cases)
    print(f"{n} cases, {len(plain)} distinct prompts, {args.threads} thread(s), answers of at most 50 tokens")
    for label, seconds, answers in (
        ("each case, every row to the end (plain)", plain_s, plain),
        ("each case, finished rows leave the batch", compact_s, compact),
        (f"cases in shared batches of {args.rows} rows", shared_s, shared),
    ):
        same = sum(answers[p] == plain[p] for p in plain)
        print(f"  {label:44s} {seconds / n:6.2f} s/case  {plain_s / seconds:5.2f}x  identical {same}/{len(plain)}")


if __name__ == "__main__":
    main()
