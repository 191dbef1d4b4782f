"""How many greedy trivia answers any change of the model's size flips: a random-direction null.

`bench/trivia_flips.py` found the default recipe's lost trivia answers sit on near ties of the base
(a few hundredths of a nat). A tie that close turns with any change of the weights, so before the
losses are blamed on the task, this measures what a change *unrelated to the task* does: each tuned
adapter's weight update is replaced, layer by layer, by a random update of the same rank and the same
norm, scaled until its next-token drift from the base (mean KL over the drift prompts) equals the
adapter's. The null model then answers the trivia questions greedily, as the probe does.

If matched random changes lose about as many right answers as the adapter, the adapter's loss is the
probe's floor for a change that size, not knowledge the task displaced.

    python bench/trivia_null.py runs/demo/default/model --labels default --draws 5
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent


def adapter_deltas(tuned) -> dict:
    """``{module name in the base model: ΔW}`` for every LoRA layer whose update is not zero."""
    out = {}
    for name, module in tuned.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            delta = module.get_delta_weight("default").detach().float()
            if delta.abs().max() > 0:
                out[name.removeprefix("base_model.model.")] = delta
    return out


def random_like(deltas: dict, rank: int, seed: int) -> dict:
    """Per layer a random rank-``rank`` matrix (Gaussian factors) with the layer's ``‖ΔW‖_F``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, d in deltas.items():
        r = torch.randn(d.shape[0], rank, generator=g) @ torch.randn(rank, d.shape[1], generator=g)
        out[name] = r * (d.norm() / r.norm())
    return out


def apply(model, base_state: dict, deltas: dict, scale: float) -> None:
    """``model``'s weights := base + ``scale`` · delta on the named layers (others untouched)."""
    import torch

    mods = dict(model.named_modules())
    with torch.no_grad():
        for name, d in deltas.items():
            w = mods[name].weight
            w.copy_(base_state[f"{name}.weight"] + scale * d.to(w.dtype))


def drift(model, tok, probe, reference) -> tuple[float, float]:
    """(mean KL from the base in nats, argmax agreement) over the drift probe's prompts."""
    from tether.probes.scorer import Scorer

    r = probe.run(Scorer(model, tok), reference=reference)
    return r.extra["kl"], r.score


def greedy_right(model, tok, probe) -> list[bool]:
    """Per item, whether ``model`` answers it right: the generation probe's own run."""
    from tether.probes.scorer import Scorer

    return [v > 0 for v in probe.run(Scorer(model, tok)).item_values]


def match_scale(model, tok, probe, reference, base_state, deltas, target_kl: float, tol: float = 0.05,
                steps: int = 12, start: float = 1.0) -> tuple[float, float, float]:
    """Bisect the scale (in log space, from ``start``) until the null's drift KL is within ``tol`` of
    ``target_kl``."""
    lo, hi = 0.0, None
    scale = start
    for _ in range(steps):
        apply(model, base_state, deltas, scale)
        kl, agree = drift(model, tok, probe, reference)
        if abs(kl / target_kl - 1) <= tol:
            break
        if kl < target_kl:
            lo = scale
            scale = scale * 2 if hi is None else math.sqrt(max(lo, 1e-6) * hi)
        else:
            hi = scale
            scale = scale / 2 if lo == 0 else math.sqrt(lo * hi)
    return scale, kl, agree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="tuned PEFT adapter directories")
    ap.add_argument("--labels", nargs="*", help="a name per adapter (default: the directories)")
    ap.add_argument("--draws", type=int, default=5, help="random nulls per adapter")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="general")
    ap.add_argument("--out", help="result file (default: results/trivia-null-general-v2-<suite>.json)")
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"trivia-null-general-v2-{args.suite}.json")
    labels = args.labels or args.models
    if len(labels) != len(args.models):
        ap.error(f"--labels: {len(labels)} names for {len(args.models)} models")

    import torch
    from rich.console import Console
    from rich.table import Table

    from tether import models
    from tether.io import write_json
    from tether.probes.scorer import Scorer
    from tether.probes.suite import load_suite, validate_suite

    probes = {p.name: p for p in validate_suite(load_suite(args.suite))}
    trivia, drift_probe = probes["trivia_gen"], probes["drift_prompts"]
    torch.manual_seed(0)
    base, tok = models.load(args.base, device="cpu")
    reference = Scorer(base, tok)
    base_right = greedy_right(base, tok, trivia)
    n_right = sum(base_right)
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    null = copy.deepcopy(base)
    results = {"suite": args.suite, "base": {"model": args.base, "right": n_right, "items": len(trivia.items)},
               "models": {}}

    def flips(right: list[bool]) -> dict:
        lost = [i for i, (a, b) in enumerate(zip(base_right, right)) if a and not b]
        gained = [i for i, (a, b) in enumerate(zip(base_right, right)) if b and not a]
        return {"right": sum(right), "rel_change": (sum(right) - n_right) / n_right, "lost": lost, "gained": gained}

    for label, path in zip(labels, args.models):
        tuned = models.load(path, base=args.base, device="cpu", with_tokenizer=False)
        deltas = adapter_deltas(tuned)
        rank = int(next(iter(tuned.peft_config.values())).r)
        kl, agree = drift(tuned, tok, drift_probe, None)
        entry = {"model": path, "layers": len(deltas), "rank": rank, "kl": kl, "agreement": agree,
                 **flips(greedy_right(tuned, tok, trivia)), "nulls": []}
        del tuned
        scale = 1.0
        for draw in range(args.draws):
            rnd = random_like(deltas, rank, seed=draw)
            scale, nkl, nagree = match_scale(null, tok, drift_probe, reference, base_state, rnd, kl, start=scale)
            entry["nulls"].append({"draw": draw, "scale": scale, "kl": nkl, "agreement": nagree,
                                   **flips(greedy_right(null, tok, trivia))})
            results["models"][label] = entry
            write_json(args.out, results)
        apply(null, base_state, deltas, 0.0)

    table = Table(title=f"trivia_gen greedy vs {args.base} ({n_right}/{len(trivia.items)} right): each adapter and "
                        f"random updates of the same rank, norm profile and drift KL")
    for col in ("model", "drift KL", "agreement", "greedy", "lost", "gained"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for label, e in results["models"].items():
        table.add_row(label, f"{e['kl']:.4f}", f"{e['agreement']:.3f}", f"{e['rel_change']:+.1%}",
                      str(len(e["lost"])), str(len(e["gained"])))
        for n in e["nulls"]:
            table.add_row(f"  random {n['draw']} (x{n['scale']:.2f})", f"{n['kl']:.4f}", f"{n['agreement']:.3f}",
                          f"{n['rel_change']:+.1%}", str(len(n["lost"])), str(len(n["gained"])))
        if e["nulls"]:
            table.add_row("  random, mean", "", "", f"{statistics.mean(n['rel_change'] for n in e['nulls']):+.1%}",
                          f"{statistics.mean(len(n['lost']) for n in e['nulls']):.1f}",
                          f"{statistics.mean(len(n['gained']) for n in e['nulls']):.1f}")
    Console().print(table)


if __name__ == "__main__":
    main()
