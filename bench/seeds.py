"""How far a recipe learns the demo task at several seeds: task accuracy and drift only, fast.

A 60-step run's task accuracy moves by 10-15 points with the seed (the LoRA init and the data
order), more than most recipe changes, so a change is judged on several seeds together, never
one. This screens variants cheaply: no guard, no full general suite, only the 200 held-out task
items and 24 drift prompts; the variants that win go to `bench/tradeoff.py` for every probe. Results
accumulate in results/seeds-general-v2-<steps>-steps-<task items>-task-items.json (or --out): a
variant/seed pair already there is not run again.

    python bench/seeds.py --seeds 0 1 2 3 4 --only "default recipe" "naive full FT"
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent

# label -> recipe overrides (`--set` strings) of the default recipe. Each label keeps the configuration it
# names: the lists below take parts of today's default back (each includes the one before it):
NO_NONTARGET = ["lwf.nontarget_alpha=0"]  # without LwF's non-target term at the task's answers
LORA_R16 = [*NO_NONTARGET, "lora.r=16", "lora.alpha=128"]  # LoRA r 16, alpha 128 instead of r 32, alpha 256
LWF_REPLAY_ROWS = ["lwf.on=replay", *LORA_R16]  # LwF on the replay rows only, not on every untrained position
RANDOM_A = ["lora.init=default", *LWF_REPLAY_ROWS]  # PEFT's random LoRA A instead of the contrast init
# replay rows in the batch's 8 slots (mode replace) instead of on top, nothing frozen instead of the bottom half
REPLACE_UNFROZEN = ["replay.mode=replace", "freeze=false", *RANDOM_A]
VARIANTS = {
    "default recipe": [],
    "replay mode replace": REPLACE_UNFROZEN,
    "replay mode add": [*REPLACE_UNFROZEN, "replay.mode=add"],
    "cosine schedule": [*REPLACE_UNFROZEN, "training.scheduler=cosine"],
    "linear schedule": [*REPLACE_UNFROZEN, "training.scheduler=linear"],
    "LoRA r64 α256": [*REPLACE_UNFROZEN, "lora.r=64", "lora.alpha=256"],
    # alpha/r 16 (twice the default's 8): learns the task further, drifts further
    "replay mode add, LoRA α256": [*REPLACE_UNFROZEN, "replay.mode=add", "lora.alpha=256"],
    "replay mode add, LoRA α256, LwF α40": [*REPLACE_UNFROZEN, "replay.mode=add", "lora.alpha=256", "lwf.alpha=40"],
    # distil every position the task loss does not train (the task rows' prompts too), not only replay rows
    "replay mode add, LwF on inputs": [*REPLACE_UNFROZEN, "replay.mode=add", "lwf.on=inputs"],
    # the embedding (and tied output) rows of the answers' tokens train too (lora.trainable_tokens)
    "replay mode add, answer tokens trained": [*REPLACE_UNFROZEN, "replay.mode=add", "lora.trainable_tokens=answers"],
    "replay mode add, answer tokens trained, LoRA α256": [
        *REPLACE_UNFROZEN, "replay.mode=add", "lora.trainable_tokens=answers", "lora.alpha=256"],
    # the larger scale's task gain with every untrained position distilled, to hold its drift
    "replay mode add, answer tokens trained, LoRA α256, LwF on inputs": [
        *REPLACE_UNFROZEN, "replay.mode=add", "lora.trainable_tokens=answers", "lora.alpha=256", "lwf.on=inputs"],
    # the same without the answer tokens: what trainable_tokens adds to the distil-inputs recipe
    "replay mode add, LoRA α256, LwF on inputs": [*REPLACE_UNFROZEN, "replay.mode=add", "lora.alpha=256",
                                                  "lwf.on=inputs"],
    # LwF on a separate general mini-batch (the distil-general recipe's, alpha 3) instead of the replay rows
    "replay mode add, answer tokens trained, LwF on general α3": [
        *REPLACE_UNFROZEN, "replay.mode=add", "lora.trainable_tokens=answers", "lwf.on=general", "lwf.alpha=3",
        "lwf.general_batch_size=4"],
    # the bottom half of the blocks frozen (their adapters too): backward stops at the middle block, which
    # pays for the replay rows on top; the second without answer tokens, whose embedding rows would need
    # gradients through every block
    "replay mode add, freeze 50%": RANDOM_A,
    "replay mode add, LoRA α256, LwF on inputs, freeze 50%": [*RANDOM_A, "lora.alpha=256", "lwf.on=inputs"],
    # the larger scale's task gain (alpha/r 16) with freezing to hold its drift (-5.1% unfrozen)
    "replay mode add, LoRA α256, freeze 50%": [*RANDOM_A, "lora.alpha=256"],
    "replay mode add, LoRA α256, freeze 67%": [*RANDOM_A, "lora.alpha=256", "freeze.fraction=0.67"],
    "replay mode add, freeze 67%": [*RANDOM_A, "freeze.fraction=0.67"],
    "replay mode add, freeze 57%": [*RANDOM_A, "freeze.fraction=0.57"],
    # each A from its layer's task-over-general input directions (lora.init contrast); the second keeps A
    # there (trains B only)
    "LoRA contrast init": LWF_REPLAY_ROWS,
    "LoRA contrast init, A frozen": [*LWF_REPLAY_ROWS, "lora.freeze_a=true"],
    # the task gain contrast buys, traded for drift by freezing 17 of 30 blocks
    "LoRA contrast init, freeze 57%": [*LWF_REPLAY_ROWS, "freeze.fraction=0.57"],
    # distil-inputs' drift holder: LwF on every position the task loss does not train
    "LoRA contrast init, LwF on inputs": LORA_R16,
    # a larger LoRA scale (alpha/r 12) to buy back the task gain LwF on inputs costs (it did not)
    "LoRA contrast init, LwF on inputs, LoRA α192": [*LORA_R16, "lora.alpha=192"],
    # half the pull on the prompts: does the task gain come back, and does drift stay within 1%?
    "LoRA contrast init, LwF on inputs α10": [*LORA_R16, "lwf.alpha=10"],
    # more of the model trained (blocks 10-29), LwF on inputs to hold the drift freezing held before
    "LoRA contrast init, LwF on inputs, freeze 33%": [*LORA_R16, "freeze.fraction=0.33"],
    # twice the contrast directions at the same alpha/r (8)
    "LoRA contrast init, LwF on inputs, LoRA r32 α256": NO_NONTARGET,
    # for trivia's lost items (bench/trivia_flips.py): the replay pool without the pack's Python-docs prose
    # (REPLAY_SOURCES), whose next-token loss pulls toward text the model did not write; a third more replay
    # rows; PEFT's random A instead of the contrast init (trivia held better with random A)
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, chats-only replay": NO_NONTARGET,
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, replay 33%": ["replay.ratio=0.33", *NO_NONTARGET],
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, random A": ["lora.init=default", *NO_NONTARGET],
    # the adapter on the attention projections only, or on the MLP only: which carries the task's answer style?
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, attention only": [
        "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", *NO_NONTARGET],
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, MLP only": ["lora.target_modules=[gate_proj,up_proj,down_proj]",
                                                                             *NO_NONTARGET],
    # LwF on the inputs and on a general mini-batch of 4 (the replay split as it is), at α 20 or 5: more general
    # positions held each step than the batch's two replay rows
    "LoRA contrast init, LwF on inputs + general batch, LoRA r32 α256": ["lwf.on=inputs+general", *NO_NONTARGET],
    "LoRA contrast init, LwF on inputs + general batch α5, LoRA r32 α256": ["lwf.on=inputs+general",
                                                                             "lwf.general_alpha=5", *NO_NONTARGET],
    # the base's ranking of the tokens no task answer uses, at the task's answer positions (decoupled KD's
    # non-target term, lwf.nontarget_alpha): learning the labels need not reorder what the model would say
    # instead; α 0.25 is the default recipe's
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, non-target α1": ["lwf.nontarget_alpha=1"],
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, non-target α4": ["lwf.nontarget_alpha=4"],
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, non-target α0.25": ["lwf.nontarget_alpha=0.25"],
    "LoRA contrast init, LwF on inputs, LoRA r32 α256, non-target α0.5": ["lwf.nontarget_alpha=0.5"],
    # A from the leading singular directions of each layer's inputs on the task data (PEFT's EVA)
    "LoRA EVA init": [*REPLACE_UNFROZEN, "lora.init=eva"],
    "naive full FT": ["lora=false", "replay=false", "lwf=false", "freeze=false", "full={}"],
}

# variants whose replay pool keeps only these sources of the pack's replay.jsonl (the default: all of them)
REPLAY_SOURCES = {"LoRA contrast init, LwF on inputs, LoRA r32 α256, chats-only replay": ["chatterbot"]}

SCREEN_SUITE = """name: seeds-screen
probes:
  - name: drift_prompts
    kind: drift
    data: pack://general-v2/drift_prompts.jsonl
    sources: [countryinfo, bsdgames]
    limit: 24
    options: {chat: true}
replay:
  data: {replay}
  sources: [{sources}]
"""


def screen_suite(runs: Path, sources: list[str] | None) -> Path:
    """The screen suite's file; with ``sources``, its replay is the pack's records of those sources only."""
    import json

    from tether.data.builtin.pack import REPLAY_SOURCES as ALL
    from tether.data.builtin.pack import ensure_pack

    replay = "pack://general-v2/replay.jsonl"
    name = "seeds-screen.yaml"
    if sources:
        lines = (ensure_pack("general-v2") / "replay.jsonl").read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if json.loads(ln)["source"] in sources]
        replay = (runs / f"replay-{'-'.join(sources)}.jsonl").resolve()  # relative paths read from the suite's folder
        replay.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        name = f"seeds-screen-{'-'.join(sources)}.yaml"
    path = runs / name
    path.write_text(SCREEN_SUITE.replace("{replay}", str(replay)).replace("{sources}", ", ".join(sources or ALL)))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--out", help="result file, read first and added to (default: results/seeds-general-v2-<steps>-"
                                  "steps-<eval-limit>-task-items.json next to this script)")
    ap.add_argument("--runs", default="runs/bench-seeds")
    args = ap.parse_args()
    args.out = args.out or str(HERE / "results" / f"seeds-general-v2-{args.steps}-steps-{args.eval_limit}-"
                                                  "task-items.json")

    import json

    from rich.console import Console
    from rich.table import Table

    from tether.config import load_recipe
    from tether.data.builtin.pack import ensure_pack
    from tether.data.builtin.tasks import ensure_task
    from tether.io import write_json
    from tether.training.run import train

    ensure_pack("general-v2")
    task = ensure_task("fortune-topics")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    base = None
    for label, overrides in VARIANTS.items():
        if args.only and label not in args.only:
            continue
        for seed in args.seeds:
            key = f"{label} (seed {seed})"
            if key in results:
                continue
            suite = screen_suite(Path(args.runs), REPLAY_SOURCES.get(label))
            recipe = load_recipe(
                None, overrides=overrides, general=str(suite),
                task={"train": str(task / "train.jsonl"), "eval": str(task / "eval.jsonl"),
                      "eval_limit": args.eval_limit, "max_new_tokens": 4},
                training={"max_steps": args.steps, "batch_size": 8, "lr": 1e-4, "logging_steps": 10, "seed": seed},
                guard={"enabled": False}, output_dir=f"{args.runs}/{key.replace(' ', '_')}")
            t0 = time.perf_counter()
            res = train(recipe, base_results=base, overwrite=True)  # a benchmark reruns its own directories
            base = {"general": res.base_results, "task": res.summary["task"]["base"]}
            s = res.summary
            results[key] = {"variant": label, "seed": seed, "task": s["task"]["final"], "task_base": s["task"]["base"],
                            "drift": next(p["rel_change"] for p in s["probes"] if p["probe"] == "drift_prompts"),
                            "wall_s": time.perf_counter() - t0}
            write_json(out, {"steps": args.steps, "eval_limit": args.eval_limit, "results": results})

    table = Table(title=f"task accuracy by seed, {args.steps} steps, {args.eval_limit} task items")
    seeds = sorted({r["seed"] for r in results.values()})
    for col in ["variant", *[f"seed {s}" for s in seeds], "mean", "drift (mean)"]:
        table.add_column(col, justify="left" if col == "variant" else "right")
    for label in dict.fromkeys(r["variant"] for r in results.values()):
        rows = {r["seed"]: r for r in results.values() if r["variant"] == label}
        accs = [r["task"] for r in rows.values()]
        drifts = [r["drift"] for r in rows.values() if r.get("drift") is not None]
        table.add_row(label, *[f"{rows[s]['task']:.1%}" if s in rows else "-" for s in seeds],
                      f"{statistics.mean(accs):.1%}", f"{statistics.mean(drifts):+.1%}" if drifts else "-")
    Console().print(table)


if __name__ == "__main__":
    main()
