"""Why greedy trivia answers flip: where a lost or gained answer leaves the base's path, and by how much.

The `trivia_gen` probe scores the greedy reply, so an item flips when one token of it changes. For each
item a tuned model gets right where the base did not, or wrong where the base was right, this finds the
first token where the two greedy replies part and reports the base's log-probability margin there (its
own token over the tuned model's) and the same margin under the tuned model. A margin of a few hundredths
of a nat is a coin toss any weight change can turn; a large margin the tuned model overturned is a
learnt shift. It also scores each item's gold answer against wrong ones by log-likelihood (the gold
answers of other items of the same subset),
as the whole chat reply and as a `Question: ... Answer:` cloze, to ask whether the model still ranks
the right answer first. Read that view with care: after a task whose answers are bare labels it rewards
the label format itself (naive full fine-tuning scores higher on it than the base), so it is reported
here, not used as a probe's score.

    python bench/trivia_flips.py runs/demo/default/model runs/demo/naive/model --labels default naive
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent
NEAR_TIE = 0.1  # nats: a base margin below this is reported as a near tie


def _choices(items: list[dict]) -> list[tuple[list[str], int]]:
    """Per item, its gold answer among up to 4 wrong ones, the gold answers of other items of the same
    subset (seeded by the item id), and the gold index."""
    by_subset: dict[str, list[str]] = {}
    for it in items:
        by_subset.setdefault(it["subset"], []).append(it["answers"][0])
    out = []
    for it in items:
        gold = it["answers"][0]
        accepted = {a.lower() for a in it["answers"]}
        wrong = sorted({a for a in by_subset[it["subset"]] if a.lower() not in accepted})
        rng = random.Random(f"trivia-choices/{it['id']}")
        choices = [gold] + rng.sample(wrong, min(4, len(wrong)))
        rng.shuffle(choices)
        out.append((choices, choices.index(gold)))
    return out


def _choice_scores(scorer, probe, choices) -> dict[str, dict[str, list[float]]]:
    """Gold-choice accuracy and probability per item, with each choice as the chat reply and as a cloze."""
    import numpy as np

    from tether.probes.multiple_choice import encode_pair, gold_probability

    tok = scorer.tokenizer
    views = {
        "reply": [(p, tok(c, add_special_tokens=False)["input_ids"])
                  for p, (cs, _) in zip(probe._ids(tok), choices) for c in cs],
        "cloze": [encode_pair(tok, f"Question: {it['prompt'][-1]['content']}\nAnswer:", " " + c)
                  for it, (cs, _) in zip(probe.items, choices) for c in cs],
    }
    out = {}
    for view, reqs in views.items():
        flat, k, acc, prob = scorer.loglikelihood(reqs), 0, [], []
        for cs, gold in choices:
            lls = [ll for ll, _ in flat[k: k + len(cs)]]
            k += len(cs)
            acc.append(float(int(np.argmax(lls)) == gold))
            prob.append(gold_probability(lls, gold))
        out[view] = {"acc": acc, "prob": prob}
    return out


def _greedy(scorer, probe) -> tuple[list[list[int]], list[float]]:
    from tether.probes.generation import is_correct

    o = probe.opts
    ids = scorer.generate_ids(probe._ids(scorer.tokenizer), max_new_tokens=o["max_new_tokens"], stop=o["stop"])
    texts = scorer.answer_texts(ids, stop=o["stop"])  # as the probe reads them
    return ids, [float(is_correct(t, it["answers"], o["metric"])) for t, it in zip(texts, probe.items)]


def _margin(base, tuned, prompt: list[int], a: list[int], b: list[int]) -> dict:
    """First token where greedy replies ``a`` (base) and ``b`` (tuned) part, and each model's margin there."""
    import torch

    # where they part, or where the shorter stopped when one reply is a prefix of the other
    k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    ctx = torch.tensor([prompt + a[:k]])
    with torch.no_grad():
        lb = base(ctx).logits[0, -1].float().log_softmax(-1)
        lt = tuned(ctx).logits[0, -1].float().log_softmax(-1)
    x = a[k] if k < len(a) else None
    y = b[k] if k < len(b) else None
    if x is None or y is None:
        return {"at": k, "base_margin": None, "tuned_margin": None}
    return {"at": k, "base_token": x, "tuned_token": y, "base_margin": float(lb[x] - lb[y]),
            "tuned_margin": float(lt[x] - lt[y])}


def _fragility(base, tok, probe, prompts, ids, right) -> list[dict]:
    """For each item the base answers right: the smallest margin between its greedy token and the runner-up
    at any reply position before the answer is complete (a near tie there can send the reply elsewhere)."""
    import torch

    from tether.probes.generation import is_correct

    out = []
    for i, ok in enumerate(right):
        if not ok:
            continue
        a = ids[i]
        with torch.no_grad():
            logp = base(torch.tensor([prompts[i] + a])).logits[0, len(prompts[i]) - 1:-1].float().log_softmax(-1)
        top2 = logp.topk(2, dim=-1).values
        end = next((k for k in range(1, len(a) + 1)
                    if is_correct(tok.decode(a[:k], skip_special_tokens=True), probe.items[i]["answers"],
                                  probe.opts["metric"])), len(a))
        gaps = (top2[:end, 0] - top2[:end, 1]).tolist()
        k = min(range(len(gaps)), key=gaps.__getitem__)
        out.append({"item": i, "min_margin": gaps[k], "at": k, "answer_done_at": end})
    return out


def _means(views: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    import statistics

    return {v: {k: statistics.mean(x) for k, x in d.items()} for v, d in views.items()}


def table_of(results: dict):
    """Per model: greedy change, items lost (how many on a base near tie, the median base margin), gained,
    and the choice views' change against the base."""
    import statistics

    from rich.table import Table

    b = results["base"]
    table = Table(title=f"trivia_gen flips vs {b['model']} ({b['right']:.0f}/{results['items']} right, "
                        f"{b['right_on_a_near_tie']} of them past a near tie < {results['near_tie_nats']} nats); "
                        f"margins in nats at the first token where the greedy replies part")
    for col in ("model", "greedy", "lost", "on a near tie", "median base margin", "gained",
                "choice acc reply / cloze", "gold prob reply / cloze"):
        table.add_column(col, justify="left" if col == "model" else "right")
    bc = b["choices"]
    for label, r in results["models"].items():
        lost = [f for f in r["flips"] if f["lost"]]
        margins = [f["base_margin"] for f in lost if f.get("base_margin") is not None]
        c = r["choices"]
        table.add_row(label, f"{r['rel_change']:+.1%}", str(len(lost)),
                      str(sum(m < results["near_tie_nats"] for m in margins)),
                      f"{statistics.median(margins):.2f}" if margins else "-", str(len(r["flips"]) - len(lost)),
                      " / ".join(f"{c[v]['acc'] / bc[v]['acc'] - 1:+.1%}" for v in ("reply", "cloze")),
                      " / ".join(f"{c[v]['prob'] / bc[v]['prob'] - 1:+.1%}" for v in ("reply", "cloze")))
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", help="tuned models: PEFT adapter or model directories")
    ap.add_argument("--show", help="print the table of a results file this script wrote, and stop")
    ap.add_argument("--labels", nargs="*", help="a name per model (default: the directories)")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="general")
    ap.add_argument("--out", help="result file (default: results/trivia-flips-general-v2-<suite>.json)")
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"trivia-flips-general-v2-{args.suite}.json")
    from rich.console import Console

    if args.show:
        import json

        Console().print(table_of(json.loads(Path(args.show).read_text(encoding="utf-8"))))
        return
    if not args.models:
        ap.error("give one or more tuned models (or --show FILE)")
    labels = args.labels or args.models
    if len(labels) != len(args.models):
        ap.error(f"--labels: {len(labels)} names for {len(args.models)} models")

    from tether import models
    from tether.io import write_json
    from tether.probes.scorer import Scorer
    from tether.probes.suite import load_suite, validate_suite

    probe = next(p for p in validate_suite(load_suite(args.suite)) if p.name == "trivia_gen")
    choices = _choices(probe.items)
    base, tok = models.load(args.base, device="cpu")
    scorer = Scorer(base, tok)
    base_ids, base_right = _greedy(scorer, probe)
    base_choice = _choice_scores(scorer, probe, choices)
    results = {"suite": args.suite, "items": len(probe.items), "near_tie_nats": NEAR_TIE,
               "base": {"model": args.base, "right": sum(base_right),
                        "choices": _means(base_choice)},
               "models": {}}
    prompts = probe._ids(tok)
    fragile = _fragility(base, tok, probe, prompts, base_ids, base_right)
    results["base"]["right_items"] = fragile
    results["base"]["right_on_a_near_tie"] = sum(f["min_margin"] < NEAR_TIE for f in fragile)
    for label, path in zip(labels, args.models):
        tuned = models.load(path, base=args.base, device="cpu", with_tokenizer=False)
        scorer = Scorer(tuned, tok)
        ids, right = _greedy(scorer, probe)
        flips = []
        for i, (r0, r1) in enumerate(zip(base_right, right)):
            if r0 != r1:
                m = _margin(base, tuned, prompts[i], base_ids[i], ids[i])
                flips.append({"item": i, "id": probe.items[i]["id"], "lost": r0 > r1,
                              "question": probe.items[i]["prompt"][-1]["content"],
                              "base_reply": tok.decode(base_ids[i], skip_special_tokens=True),
                              "tuned_reply": tok.decode(ids[i], skip_special_tokens=True), **m})
        ch = _choice_scores(scorer, probe, choices)
        results["models"][label] = {
            "model": path, "right": sum(right), "rel_change": (sum(right) - sum(base_right)) / sum(base_right),
            "flips": flips,
            "choices": _means(ch)}
        del tuned, scorer
        write_json(args.out, results)

    Console().print(table_of(results))


if __name__ == "__main__":
    main()
