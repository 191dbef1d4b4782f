"""Step-time overhead of each method: plain HF Trainer + PEFT LoRA vs tether's LoRA with a method on.

Same model (the embedded SmolLM2 by default), data, batch size and seed; every configuration runs
the same number of optimizer steps after warm-up steps, in one process, one after another. CPU
wall time is noisy on a shared machine, so each configuration keeps its *median* step time and the
table reports the ratio to plain Trainer + PEFT measured in the same run: first, and again last,
the reference (a process's first run also pays for warming up: clocks, allocator, caches). Writes
results/step-overhead-<model>-<device>-b<batch>.json unless --out says otherwise.

    python bench/step_overhead.py --steps 8 --warmup 2 --batch-size 8
    python bench/step_overhead.py --random-config qwen2-0.5b --bf16    # real shapes on a GPU, no weights
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
HERE = Path(__file__).resolve().parent

CONFIGS = {
    "tether LoRA": {"lora": {}},
    "+ replay 20%": {"lora": {}, "replay": {"ratio": 0.25}},
    "+ freeze 50%": {"lora": {}, "freeze": {"fraction": 0.5}},
    "+ EWC": {"lora": {}, "ewc": {"fisher_samples": 32}},
    "+ LwF": {"lora": {}, "lwf": {}},
    # the default recipe's LwF: distil on the batch's replay rows only (2 of 8 here)
    "+ replay 25% + LwF on replay rows": {"lora": {}, "replay": {"ratio": 0.25}, "lwf": {"on": "replay"}},
    "+ replay 25% + LwF on a general batch": {"lora": {}, "replay": {"ratio": 0.25}, "lwf": {"on": "general"}},
    # the default recipe's LoRA drops dropout (masks on the inputs of every adapted layer)
    "+ replay 25% + LwF on replay rows, LoRA dropout 0": {"lora": {"dropout": 0.0}, "replay": {"ratio": 0.25},
                                                          "lwf": {"on": "replay"}},
    # every position the task loss does not train: one teacher forward over the whole batch
    "+ replay 25% + LwF on inputs": {"lora": {}, "replay": {"ratio": 0.25}, "lwf": {"on": "inputs"}},
    # replay.mode add (opt-in): the replay rows come on top of the 8 task rows (8 + 2 per step)
    "+ replay 20% on top (mode add) + LwF on replay rows, LoRA dropout 0": {
        "lora": {"dropout": 0.0}, "replay": {"ratio": 0.2, "mode": "add"}, "lwf": {"on": "replay"}},
    # lora.trainable_tokens: the answers' embedding (tied: output) rows train too; PEFT writes them
    # into a copy of the embedding matrix every forward
    "+ replay 20% on top (mode add) + LwF on replay rows, LoRA dropout 0, answer tokens trained": {
        "lora": {"dropout": 0.0, "trainable_tokens": "answers"}, "replay": {"ratio": 0.2, "mode": "add"},
        "lwf": {"on": "replay"}},
    # no dropout: the batch's shared prompt prefix runs once (tether.prefix; dropout turns that off)
    "tether LoRA, dropout 0": {"lora": {"dropout": 0.0}},
    "tether full fine-tuning": {"full": {}},
}
# these again with training.share_prefix off: what running the shared prefix once saves
UNSHARED = ("tether LoRA, dropout 0", "tether full fine-tuning", "default recipe's methods",
            "distil-inputs recipe's methods")

# the recipes with a frozen lower half, again with LwF's teacher running every block (tether.trunk off):
# what starting it at the first trained block saves; and with LoRA's zero adapters left on the frozen
# blocks instead of taken off them
FROZEN_HALF = ("default recipe's methods", "default recipe's methods, LoRA r16 α128")


# Qwen2-0.5B's shapes (its config.json), for timing on a machine that holds no weights: randomly
# initialised, fed SmolLM2's token ids (all below 49152, so any of Qwen2's 151936 rows is valid)
RANDOM_CONFIGS = {
    "qwen2-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                   "tie_word_embeddings": True},
}


class StepTimer:
    """Trainer callback recording each optimizer step's wall time."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            times: list[float] = []

            def on_step_begin(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.t0)

        cb = Cb()
        cb.times = []
        return cb


class Profiled:
    """Trainer callback running ``torch.profiler`` from the first timed step to the end of training."""

    def __new__(cls, warmup: int):
        import torch
        from transformers import TrainerCallback

        class Cb(TrainerCallback):
            prof = None

            def on_step_begin(self, args, state, control, **kw):
                if self.prof is None and state.global_step == warmup:
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.__enter__()

            def on_train_end(self, args, state, control, **kw):
                if self.prof is not None:
                    self.prof.__exit__(None, None, None)

            def top(self, steps: int, k: int = 15) -> list[dict]:
                """The ``k`` ops with the most self time per step (device time where there is a GPU)."""
                if self.prof is None:
                    return []
                rows = []
                for e in self.prof.key_averages():
                    device_us = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
                    rows.append({"op": e.key, "calls_per_step": e.count / steps,
                                 "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                                 "self_device_ms_per_step": device_us / 1e3 / steps})
                key = "self_device_ms_per_step" if torch.cuda.is_available() else "self_cpu_ms_per_step"
                return sorted(rows, key=lambda r: -r[key])[:k]

        return Cb()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="weights to time (and the tokenizer)")
    ap.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS),
                    help="time these shapes, randomly initialised, instead of --model's weights")
    ap.add_argument("--bf16", action="store_true", help="HF Trainer's bf16 mixed precision (GPU)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--only", nargs="*", help="run only these configurations (plain Trainer + PEFT always runs)")
    ap.add_argument("--profile", action="store_true",
                    help="torch.profiler over the timed steps: each configuration's top ops per step go in the JSON "
                         "(the profiler's own overhead is in those steps' times)")
    ap.add_argument("--out", help="result file (default: results/step-overhead-<model>-<device>-b<batch>.json "
                                  "next to this script)")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from rich.console import Console
    from rich.table import Table
    from transformers import Trainer

    from tether import models
    from tether.config import TrainingSpec, load_recipe
    from tether.data.builtin.pack import ensure_pack
    from tether.data.builtin.tasks import ensure_task
    from tether.data.collate import Collator
    from tether.data.formats import encode_records
    from tether.data.readers import read_records
    from tether.io import write_json
    from tether.methods.base import Context
    from tether.methods.lora import LoraMethodConfig
    from tether.registry import METHODS
    from tether.training.teacher import make_reference
    from tether.training.trainer import TetherTrainer, as_dataset, training_arguments

    torch.manual_seed(0)
    task_dir, pack = ensure_task("fortune-topics"), ensure_pack("general-v2")
    total = args.steps + args.warmup
    spec = TrainingSpec(max_steps=total, batch_size=args.batch_size, lr=1e-4, logging_steps=10_000, bf16=args.bf16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}

    def run(label, make):
        if args.random_config:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = dict(RANDOM_CONFIGS[args.random_config])
            torch.manual_seed(0)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
            tok = models.load_tokenizer(args.model)
        else:
            model, tok = models.load(args.model, device=device)
        trainer = make(model, tok)
        timer = StepTimer()
        trainer.add_callback(timer)
        profiler = Profiled(args.warmup) if args.profile else None
        if profiler is not None:
            trainer.add_callback(profiler)
        trainer.train()
        times = timer.times[args.warmup:]
        results[label] = {"median_s": statistics.median(times), "mean_s": statistics.mean(times), "steps": len(times)}
        if profiler is not None:
            results[label]["profile_top_ops_per_step"] = profiler.top(len(times))
        if torch.cuda.is_available():
            results[label]["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            del model, trainer
            gc.collect()  # free this configuration's model before the next one's peak is read
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        Console().print(f"{label}: median {results[label]['median_s']:.3f} s/step")

    def task_examples(tok):
        return encode_records(read_records(task_dir / "train.jsonl"), tok, max_length=256)[0]

    def plain(model, tok):
        examples = task_examples(tok)
        lcfg = LoraMethodConfig()
        peft_model = get_peft_model(model, LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                                      target_modules=lcfg.target_modules, task_type="CAUSAL_LM"))
        return Trainer(model=peft_model, args=training_arguments(spec, "/tmp/tether-bench-plain"),
                       train_dataset=as_dataset(examples), data_collator=Collator(tok.pad_token_id))

    def plain_full(model, tok):
        examples = task_examples(tok)
        return Trainer(model=model, args=training_arguments(spec, "/tmp/tether-bench-plain-full"),
                       train_dataset=as_dataset(examples), data_collator=Collator(tok.pad_token_id))

    def tethered(methods_cfg, share_prefix: bool | None = None, share_trunk: bool = True, keep_dead: bool = False):
        def make(model, tok):
            examples = task_examples(tok)
            general = encode_records(read_records(pack / "replay.jsonl", limit=400), tok, max_length=256)[0]
            methods = {n: METHODS.get(n)(c) for n, c in methods_cfg.items()}
            if keep_dead and "lora" in methods:  # zero adapters stay on the frozen blocks
                methods["lora"]._drop_dead = lambda model: None
            ctx = Context(tokenizer=tok, general_examples=general, task_examples=examples, batch_size=args.batch_size,
                          num_batches=total)
            for m in methods.values():
                model = m.prepare_model(model, ctx)
            if any(m.needs_reference for m in methods.values()):
                import dataclasses

                ctx = dataclasses.replace(ctx, reference=make_reference(model, share_trunk=share_trunk))
            model.train()
            for m in methods.values():
                m.on_task_start(model, ctx)
            data = examples
            for m in methods.values():
                data = m.prepare_data(data, ctx)
            return TetherTrainer(model=model, args=training_arguments(spec, "/tmp/tether-bench-t"),
                                 train_dataset=as_dataset(data), data_collator=Collator(tok.pad_token_id),
                                 methods=methods, context=ctx, share_prefix=share_prefix)
        return make

    # the default recipe's methods as default.yaml has them, its self-answered replay included (longer
    # rows than the ChatterBot replies above), and with parts of it taken back: no LwF non-target term,
    # LoRA r 16, LwF on the replay rows only, and replay mode replace with nothing frozen and PEFT's random A
    default = load_recipe(None).methods
    r16 = ["lora.r=16", "lora.alpha=128"]  # half the default's LoRA rank (r 32, alpha 256), the same alpha/r
    before = load_recipe(None, overrides=["replay.mode=replace", "freeze=false", "lora.init=default",
                                          "lwf.on=replay", *r16]).methods
    configs = {**CONFIGS, "default recipe's methods": default,
               # without LwF's non-target term at the task's answers
               "default recipe's methods, no LwF non-target term": load_recipe(
                   None, overrides=["lwf.nontarget_alpha=0"]).methods,
               "default recipe's methods, LoRA r16 α128": load_recipe(None, overrides=r16).methods,
               # LwF on the replay rows only (the default distils every position the task loss does not train)
               "default recipe's methods, LoRA r16 α128, LwF on replay rows": load_recipe(
                   None, overrides=["lwf.on=replay", *r16]).methods,
               "default recipe's methods, replay mode replace, nothing frozen, random A, LwF on replay rows": before,
               "distil-inputs recipe's methods": load_recipe("distil-inputs").methods}
    run("plain Trainer + PEFT LoRA", plain)
    if not args.only or "plain Trainer full fine-tuning" in args.only:
        run("plain Trainer full fine-tuning", plain_full)
    for label, cfg in configs.items():
        if not args.only or label in args.only:
            # the pairs set sharing explicitly (tether's auto leaves it off on a GPU); the rest run as tether would
            run(label, tethered(cfg, share_prefix=True if label in UNSHARED else None))
        unshared = f"{label}, prefix sharing off"
        if label in UNSHARED and (not args.only or unshared in args.only):
            run(unshared, tethered(cfg, share_prefix=False))
        # the LwF teacher runs every block instead of starting at the first trained one
        whole = f"{label}, teacher runs every block"
        if label in FROZEN_HALF and (not args.only or whole in args.only):
            run(whole, tethered(cfg, share_trunk=False))
        kept = f"{label}, zero adapters kept on the frozen blocks"
        if label in FROZEN_HALF and (not args.only or kept in args.only):
            run(kept, tethered(cfg, keep_dead=True))
    # again, last: the first run of a process also pays for warming up (on a GPU: clocks, allocator)
    run("plain Trainer + PEFT LoRA, again", plain)
    ref = results["plain Trainer + PEFT LoRA, again"]["median_s"]
    shapes = f"{args.random_config} (random init)" if args.random_config else args.model
    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    precision = ", bf16" if args.bf16 else ""
    table = Table(title=f"step time, {shapes}, {where}{precision}, batch {args.batch_size}, "
                        f"median of {args.steps} steps (after {args.warmup} warm-up), one process")
    for col in ("configuration", "s/step", "vs plain Trainer+PEFT (run last)"):
        table.add_column(col, justify="right" if col != "configuration" else "left")
    for label, r in results.items():
        r["ratio"] = r["median_s"] / ref
        table.add_row(label, f"{r['median_s']:.3f}", f"{r['ratio']:.2f}x ({r['ratio'] - 1:+.0%})")
    Console().print(table)
    if not args.out:
        tag = (torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available()
               else f"cpu-{torch.get_num_threads()}-threads")
        bf16 = "-bf16" if args.bf16 else ""
        name = args.random_config + "-random" if args.random_config else args.model
        args.out = str(HERE / "results" / f"step-overhead-{name}-{tag}{bf16}-b{args.batch_size}.json")
    write_json(args.out, {"model": shapes, "device": where, "bf16": args.bf16, "batch_size": args.batch_size,
                          "steps": args.steps, "threads": torch.get_num_threads(), "results": results})


if __name__ == "__main__":
    main()
