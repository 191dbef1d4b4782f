"""Evaluation with shared prompt prefixes run once vs every row running its own, and lm-eval's HFLM.

The demo's general suite (`general-demo`) and its held-out task items (80, 4 new tokens, as in `make
demo`) are scored by a fine-tuned model (here: the embedded model with one MLP perturbed, so drift
compares two different models) with the Scorer's ``share_prefix`` on and off, in one process,
alternating, each keeping its best of ``--repeats``; every score must agree to 1e-6 relative. The task's greedy
generation is also run through lm-evaluation-harness's ``HFLM.generate_until`` on the same prompts
(decoded to text, as lm-eval takes them), the tool a user would otherwise reach for.

Writes results/eval-prefix-sharing-general-v2-<suite>-<task items>-task-items.json unless --out says otherwise.

    python bench/eval_prefix.py --repeats 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="general-demo")
    ap.add_argument("--task-items", type=int, default=80)
    ap.add_argument("--repeats", type=int, default=2, help="runs per side; the best one counts")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    ap.add_argument("--no-harness", action="store_true", help="skip lm-eval's generate_until")
    ap.add_argument("--out", type=Path, help="result file (default: results/eval-prefix-sharing-general-v2-<suite>-"
                                             "<task-items>-task-items.json next to this script)")
    args = ap.parse_args()
    args.out = args.out or HERE / "results" / (f"eval-prefix-sharing-general-v2-{args.suite}-{args.task_items}-"
                                               "task-items.json")

    import torch
    from rich.console import Console
    from rich.table import Table

    from tether.api import _task_probe
    from tether.data.builtin.tasks import ensure_task
    from tether.io import write_json
    from tether.models import load
    from tether.probes.scorer import Scorer
    from tether.probes.suite import validate_suite

    if args.threads:
        torch.set_num_threads(args.threads)
    base, tok = load(args.model)
    tuned = load(args.model, with_tokenizer=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a fine-tuned stand-in: drift then compares two different models
        for name, p in tuned.named_parameters():
            if ".layers.20.mlp." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    task = _task_probe(ensure_task("fortune-topics") / "eval.jsonl", limit=args.task_items, max_new_tokens=4)
    probes = validate_suite(args.suite) + [task]

    rows: dict[str, dict] = {}
    for _ in range(args.repeats):
        for share in (False, True):
            scorer, reference = Scorer(tuned, tok, share_prefix=share), Scorer(base, tok, share_prefix=share)
            for probe in probes:
                t = time.perf_counter()
                res = probe.run(scorer, reference=reference)
                wall = time.perf_counter() - t
                side = rows.setdefault(probe.name, {}).setdefault("on" if share else "off", {})
                if "wall_s" not in side or wall < side["wall_s"]:
                    side.update(wall_s=wall, score=res.score)
    for r in rows.values():
        r["speedup"] = r["off"]["wall_s"] / r["on"]["wall_s"]
        a, b = r["off"]["score"], r["on"]["score"]
        r["rel_diff"] = abs(a - b) / max(abs(a), 1e-12)  # float rounding: the prefix's activations are computed once
        r["identical"] = r["rel_diff"] < 1e-6

    harness = None
    if not args.no_harness:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=tuned, tokenizer=tok, batch_size=32)
        prompts = [tok.decode(ids) for ids in task._ids(tok)]
        stop = list(task.opts["stop"] or []) or [tok.eos_token]
        reqs = [Instance(request_type="generate_until", doc={}, idx=0,
                         arguments=(p, {"until": stop, "max_gen_toks": 4, "do_sample": False})) for p in prompts]
        best = None
        for _ in range(args.repeats):
            t = time.perf_counter()
            outs = lm.generate_until(reqs, disable_tqdm=True)
            wall = time.perf_counter() - t
            best = wall if best is None else min(best, wall)
        ours = Scorer(tuned, tok).generate(task._ids(tok), max_new_tokens=4, stop=task.opts["stop"])
        same = sum(a.strip() == b.strip() for a, b in zip(outs, ours))
        harness = {"wall_s": best, "vs_tether_shared": best / rows["task"]["on"]["wall_s"],
                   "same_generations": same, "n": len(prompts)}

    result = {"model": args.model, "suite": args.suite, "task_items": args.task_items, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "probes": rows, "harness_generate_until": harness,
              "total_off_s": sum(r["off"]["wall_s"] for r in rows.values()),
              "total_on_s": sum(r["on"]["wall_s"] for r in rows.values())}
    result["total_speedup"] = result["total_off_s"] / result["total_on_s"]
    write_json(args.out, result)

    table = Table(title=f"scoring with shared prompt prefixes: {args.model}, suite {args.suite} + task "
                        f"({args.task_items} items), {torch.get_num_threads()} thread(s), best of {args.repeats}")
    for col in ("probe", "each row its own prefix (s)", "prefix once (s)", "speed-up", "same score (1e-6)"):
        table.add_column(col, justify="left" if col == "probe" else "right")
    for name, r in rows.items():
        table.add_row(name, f"{r['off']['wall_s']:.2f}", f"{r['on']['wall_s']:.2f}", f"{r['speedup']:.2f}x",
                      "yes" if r["identical"] else "NO")
    table.add_row("all", f"{result['total_off_s']:.2f}", f"{result['total_on_s']:.2f}",
                  f"{result['total_speedup']:.2f}x", "")
    console = Console()
    console.print(table)
    if harness:
        console.print(f"task generation through lm-eval HFLM.generate_until: {harness['wall_s']:.2f} s "
                      f"({harness['vs_tether_shared']:.2f}x tether's with shared prefixes); "
                      f"{harness['same_generations']}/{harness['n']} generations the same")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
