"""`make demo`: naive full fine-tuning vs the default recipe, same task, steps and seed.

The task routes quotes to one of 8 topic labels. A narrow output format is what makes a small
instruct model forget: after naive fine-tuning it answers general questions with a label. The
default recipe (LoRA with each trained A at the task-over-general input directions + 20% replay + LwF
on every position the task loss does not train + the bottom half of the blocks frozen + lr 1e-4 +
guard) should learn the task and keep the rest.
"""

from __future__ import annotations

from pathlib import Path

from ..config import load_recipe
from .run import train

# sized so that `make demo` (install included) stays under 15 minutes on 2 cores of an AVX2-only CPU
DEMO_STEPS = 40


def run_demo(steps: int = DEMO_STEPS, output_dir: str | Path = "runs/demo", batch_size: int = 8) -> dict:
    from rich.console import Console

    from ..data.builtin.pack import ensure_pack
    from ..data.builtin.tasks import ensure_task
    from ..io import write_json

    console = Console()
    ensure_pack("general-v2")
    task_dir = ensure_task("fortune-topics")
    out = Path(output_dir)
    common = {"task": {"train": str(task_dir / "train.jsonl"), "eval": str(task_dir / "eval.jsonl"), "eval_limit": 60,
                       "max_new_tokens": 4},
              "general": "general-demo"}
    training = {"max_steps": steps, "batch_size": batch_size, "lr": 1e-4, "logging_steps": 5}
    runs = {
        "naive full FT": load_recipe("naive", **common, training=training, output_dir=str(out / "naive")),
        # the guard watches the demo's own general suite (its base scores are the ones already taken, and
        # its check at the last step is the table's final score: no probe is scored twice)
        "default recipe": load_recipe("default", **common, training=training,
                                      guard={"every": steps, "suite": common["general"]},
                                      output_dir=str(out / "default")),
    }
    results = {}
    base = None
    for label, recipe in runs.items():
        console.rule(f"[bold]{label}[/]: {', '.join(recipe.methods)}, {steps} steps")
        res = train(recipe, base_results=base, overwrite=True)  # the demo's own directories, rerun as a whole
        base = {"general": res.base_results, "task": res.summary["task"]["base"]}
        results[label] = res.summary

    console.print(demo_table(results, steps))
    write_json(out / "demo.json", results)
    console.print(f"wrote {out / 'demo.json'}")
    return results


def demo_table(results: dict, steps: int):
    """One row per probe: base score and each run's relative change with its paired CI."""
    from rich.table import Table

    table = Table(title=f"tether demo: SmolLM2-135M-Instruct, quote-topic routing, {steps} steps each",
                  caption="change = relative change vs base (95% paired-bootstrap CI) -items lost/+gained; "
                          "* shares a source with replay")
    table.add_column("probe")
    table.add_column("base", justify="right")
    for label in results:
        table.add_column(label, justify="right")
    t0 = next(iter(results.values()))["task"]
    table.add_row("task accuracy (exact match)", f"{t0['base']:.1%}",
                  *[f"{s['task']['final']:.1%} ({s['task']['gain']:+.1%} abs)" for s in results.values()])
    colours = {"forgot": "red", "uncertain": "yellow", "ok": "green", "improved": "green"}
    for i, p in enumerate(next(iter(results.values()))["probes"]):
        cells = []
        for s in results.values():
            c = s["probes"][i]
            flips = f" -{c['flips']['lost']}/+{c['flips']['gained']}" if c.get("flips") else ""
            cells.append(f"[{colours[c['verdict']]}]{c['rel_change']:+.1%}[/] {_ci(c)}{flips}")
        name = p["probe"] + (" *" if p["shares_source_with_replay"] else "")
        table.add_row(f"{name} ({p['metric']}{'' if p['higher_is_better'] else ', lower better'})", f"{p['base']:.3g}",
                      *cells)
        if "prob" in p.get("secondary", {}):  # MC: the gold-choice probability moves with every item
            table.add_row(f"  {p['probe']} (gold-choice probability)", f"{p['secondary']['prob']['base']:.3g}",
                          *[_ci(s["probes"][i]["secondary"]["prob"], with_value=True) for s in results.values()])
    table.add_row("wall time", "", *[f"{s['seconds']:.0f} s" for s in results.values()])
    return table


def _ci(change: dict, with_value: bool = False) -> str:
    ci = f"[{change['ci_low']:+.0%}, {change['ci_high']:+.0%}]"
    return f"{change['rel_change']:+.1%} {ci}" if with_value else ci
