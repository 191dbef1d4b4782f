"""Multiple-choice scoring speed: tether's Scorer vs lm-evaluation-harness's HFLM, same items and model.

Items default to the 282 MMLU questions shipped inside lm_eval (the flan CoT few-shot prompts), asked
cloze-style: context ``Question: ...\\nAnswer:``, one continuation per option text, so choices have
several tokens and ``acc_norm`` differs from ``acc``. Both sides include tokenisation in their time.
Wall time on a shared machine is noisy, so CPU time (all threads of this process) is reported too,
and each side keeps its best of ``--repeats`` runs. One torch thread by default: on a busy 2-core
machine, OpenMP barriers make multi-threaded timings of either side swing by up to 10x.

Writes results/eval-speed-<items>-<n>.json (``mmlu``, or the items file's name and folder, e.g.
``knowledge_mc-general-v2``) unless --out says otherwise.

    python bench/eval_speed.py --n-items 100 --batch-size 32
    python bench/eval_speed.py --items $TETHER_HOME/data/general-v2/knowledge_mc.jsonl --n-items 200
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent


def mmlu_cot_items() -> list[dict]:
    """Parse lm_eval's MMLU CoT prompts: ``Q:`` blocks, ``(A)..(D)`` options, ``The answer is (X)``."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"
    items = []
    for subject, text in json.loads(path.read_text(encoding="utf-8")).items():
        for block in re.split(r"\n\nQ: ", text)[1:]:
            m = re.search(r"^(.*?)\n\(A\)(.*?)\nA: (.*)$", block, re.DOTALL)
            gold = re.search(r"answer is \(([A-D])\)", m.group(3)) if m else None
            if not m or not gold:
                continue
            parts = re.split(r"\s*\(([A-D])\)\s*", "(A)" + m.group(2))
            letters, texts = parts[1::2], [t.strip() for t in parts[2::2]]
            if letters != list("ABCD") or not all(texts):
                continue
            items.append({"query": f"Question: {m.group(1).strip()}\nAnswer:", "choices": texts,
                          "gold": "ABCD".index(gold.group(1)), "subject": subject})
    return items


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def _decisions(lls: list[float], items: list[dict]) -> list[tuple[int, int, bool]]:
    """Per item (pred, pred_norm, tied): tied when the top two (raw or normalised) are within 1e-3."""
    from tether.probes.multiple_choice import decisions

    out, k = [], 0
    for it in items:
        ll = lls[k: k + len(it["choices"])]
        k += len(it["choices"])
        norm = [x / len(c) for x, c in zip(ll, it["choices"])]
        tied = any(top[-1] - top[-2] < 1e-3 for top in (sorted(ll), sorted(norm)))
        out.append((*decisions(ll, it["choices"]), tied))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-items", type=int, default=282, help="first N items (default: all)")
    ap.add_argument("--batch-size", type=int, default=32, help="requests per forward, both sides")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="tether alias, path or hub id")
    ap.add_argument("--items", type=Path, help="a JSONL of {query, choices, gold} instead of MMLU")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side; the best one counts")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's choice)")
    ap.add_argument("--out", type=Path, help="result file (default: results/eval-speed-<items>-<n>.json next to "
                                             "this script)")
    args = ap.parse_args()

    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from rich.console import Console
    from rich.table import Table

    from tether.data.readers import read_records
    from tether.io import write_json
    from tether.models import load
    from tether.probes.multiple_choice import MultipleChoiceProbe
    from tether.probes.scorer import Scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    items = [r.data for r in read_records(args.items)] if args.items else mmlu_cot_items()
    items = items[: args.n_items]
    source = f"{args.items.stem}-{args.items.parent.name}" if args.items else "mmlu"
    args.out = args.out or HERE / "results" / f"eval-speed-{source}-{len(items)}.json"
    model, tok = load(args.model)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    scorer = Scorer(model, tok, batch_size=args.batch_size)

    def run_harness():
        reqs = [Instance(request_type="loglikelihood", doc=it, arguments=(it["query"], " " + c), idx=i)
                for it in items for i, c in enumerate(it["choices"])]
        return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]

    def run_tether():
        per_item = MultipleChoiceProbe("mc", items).item_loglikelihoods(scorer)  # fresh: tokenises too
        return [ll for lls in per_item for ll in lls]

    scorer.loglikelihood([(tok("warm up")["input_ids"], tok(" now")["input_ids"])])  # first-call costs
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, fn in (("lm-eval HFLM", run_harness), ("tether Scorer", run_tether)):
            lls, wall, cpu = _timed(fn)
            if name not in best or wall < best[name][1]:
                best[name] = (lls, wall, cpu)

    (h_lls, h_wall, h_cpu), (t_lls, t_wall, t_cpu) = best["lm-eval HFLM"], best["tether Scorer"]
    h_dec, t_dec = _decisions(h_lls, items), _decisions(t_lls, items)
    untied = [(h, t) for h, t in zip(h_dec, t_dec) if not h[2]]
    agree_acc = sum(h[0] == t[0] for h, t in untied) / max(len(untied), 1)
    agree_norm = sum(h[1] == t[1] for h, t in untied) / max(len(untied), 1)
    gold = [it["gold"] for it in items]
    n = len(items)
    result = {
        "model": args.model, "device": str(scorer.device), "threads": torch.get_num_threads(),
        "n_items": n, "n_requests": len(h_lls), "batch_size": args.batch_size, "repeats": args.repeats,
        "harness": {"wall_s": h_wall, "cpu_s": h_cpu, "items_per_s": n / h_wall, "items_per_cpu_s": n / h_cpu,
                    "acc": sum(d[0] == g for d, g in zip(h_dec, gold)) / n,
                    "acc_norm": sum(d[1] == g for d, g in zip(h_dec, gold)) / n},
        "tether": {"wall_s": t_wall, "cpu_s": t_cpu, "items_per_s": n / t_wall, "items_per_cpu_s": n / t_cpu,
                   "acc": sum(d[0] == g for d, g in zip(t_dec, gold)) / n,
                   "acc_norm": sum(d[1] == g for d, g in zip(t_dec, gold)) / n},
        "speedup_wall": h_wall / t_wall, "speedup_cpu": h_cpu / t_cpu,
        "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(h_lls, t_lls)),
        "n_untied_items": len(untied), "agreement_acc": agree_acc, "agreement_acc_norm": agree_norm,
    }
    write_json(args.out, result)

    table = Table(title=f"Multiple-choice scoring: {n} items, {len(h_lls)} requests, "
                        f"batch {args.batch_size}, "
                        f"{args.model} on {scorer.device} ({torch.get_num_threads()} threads)")
    for col in ("", "items/s (wall)", "items/s (CPU)", "wall s", "acc", "acc_norm"):
        table.add_column(col, justify="right" if col else "left")
    for name, key in (("lm-eval HFLM", "harness"), ("tether Scorer", "tether")):
        r = result[key]
        table.add_row(name, f"{r['items_per_s']:.2f}", f"{r['items_per_cpu_s']:.2f}", f"{r['wall_s']:.1f}",
                      f"{r['acc']:.3f}", f"{r['acc_norm']:.3f}")
    table.add_row("speed-up", f"{result['speedup_wall']:.2f}x", f"{result['speedup_cpu']:.2f}x", "", "", "")
    console = Console()
    console.print(table)
    console.print(f"decisions agree (ties aside, {len(untied)} items): acc {agree_acc:.3f}, "
                  f"acc_norm {agree_norm:.3f}; max |loglik diff| {result['max_abs_loglik_diff']:.2e}")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
