"""Rescue a model that forgot: WiSE-FT interpolation vs a recovery run vs the default recipe from scratch.

Starts from the naive full fine-tune of `tether demo` (the same run as in `bench/tradeoff.py`, the one that
forgets) and compares, on the same task and general probes: interpolating back toward the base
(no training), `tether recover` (replay-heavy training with the guard in recover mode), and the
default recipe trained from the base. Compute is wall time and optimizer steps in one process.

Writes results/rescue-naive-demo-general-v2-<suite>.json unless --out says otherwise.

    python bench/rescue.py --naive runs/demo/naive --default runs/demo/default
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive", default="runs/demo/naive", help="run folder of a naive full fine-tune (tether demo)")
    ap.add_argument("--default", default="runs/demo/default", help="run folder of the default recipe (tether demo)")
    ap.add_argument("--suite", default="general-demo")
    ap.add_argument("--recover-steps", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=80)
    ap.add_argument("--out", help="result file (default: results/rescue-naive-demo-general-v2-<suite>.json)")
    ap.add_argument("--runs", default="runs/bench-rescue")
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"rescue-naive-demo-general-v2-{args.suite}.json")

    from rich.console import Console
    from rich.table import Table

    from tether import api
    from tether.data.builtin.tasks import ensure_task
    from tether.io import write_json

    task = ensure_task("fortune-topics")
    naive_dir, default_dir = Path(args.naive), Path(args.default)
    for d in (naive_dir, default_dir):
        if not (d / "summary.json").exists():
            raise SystemExit(f"{d}: run `tether demo` first (it trains the naive fine-tune and the default recipe)")
    naive = json.loads((naive_dir / "summary.json").read_text())
    default = json.loads((default_dir / "summary.json").read_text())
    rows = {}

    def row(label, task_score, comps, steps, seconds, note=""):
        drops = [c["drop"] if isinstance(c, dict) else c.drop for c in comps]
        rows[label] = {"task": task_score, "worst_drop": max(drops), "mean_drop": sum(drops) / len(drops),
                       "train_steps": steps, "seconds": round(seconds, 1), "note": note,
                       "probes": {(c["probe"] if isinstance(c, dict) else c.probe):
                                  (c["drop"] if isinstance(c, dict) else c.drop) for c in comps}}

    row("naive full FT (the forgotten model)", naive["task"]["final"], naive["probes"], naive["steps"],
        naive["seconds"])
    t0 = time.perf_counter()
    res = api.interpolate("smollm2-135m-instruct", str(naive_dir / "model"), task_eval=task / "eval.jsonl",
                          suite=args.suite, output_dir=f"{args.runs}/interpolate", max_new_tokens=4,
                          alphas=(0.0, 0.25, 0.5, 0.75, 1.0))
    chosen = res.points[res.chosen]
    row(f"WiSE-FT interpolation (alpha={res.chosen_alpha:g})", chosen.task.score, chosen.comparisons, 0,
        time.perf_counter() - t0, "5 alphas scored")
    t0 = time.perf_counter()
    rec = api.recover(str(naive_dir / "model"), "smollm2-135m-instruct", str(task / "train.jsonl"),
                      eval_data=str(task / "eval.jsonl"), max_steps=args.recover_steps, suite=args.suite,
                      output_dir=f"{args.runs}/recover", overwrite=True,
                      overrides=["task.max_new_tokens=4", f"task.eval_limit={args.eval_limit}"])
    s = rec.summary
    row("tether recover", s["task"]["final"], s["probes"], s["steps"], time.perf_counter() - t0,
        f"recovered at step {s['recovery']['recovered_at']}")
    row("default recipe from scratch", default["task"]["final"], default["probes"], default["steps"],
        default["seconds"])
    write_json(args.out, {"suite": args.suite, "base_task": naive["task"]["base"], "rows": rows})

    table = Table(title="rescuing a forgotten model (SmolLM2-135M, quote-topic routing)",
                  caption=f"base task accuracy {naive['task']['base']:.1%}; drop = relative loss of a general "
                          "probe vs the base (positive = worse)")
    for col in ("approach", "task acc", "worst drop", "mean drop", "train steps", "wall s", "note"):
        table.add_column(col, justify="left" if col in ("approach", "note") else "right")
    for label, r in rows.items():
        table.add_row(label, f"{r['task']:.1%}", f"{r['worst_drop']:+.1%}", f"{r['mean_drop']:+.1%}",
                      str(r["train_steps"]), f"{r['seconds']:.0f}", r["note"])
    Console().print(table)


if __name__ == "__main__":
    main()
