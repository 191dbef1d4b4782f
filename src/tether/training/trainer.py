"""`TetherTrainer`: HF Trainer plus the method plugins, through one `compute_loss` override.

Callbacks decide *when* (the guard, metric logging); this subclass decides *what* the loss is. It
stays small on purpose: per-method logic lives in the methods, scheduling in callbacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import ProgressCallback, Trainer, TrainerCallback
from transformers.modeling_outputs import CausalLMOutputWithPast

from .. import prefix
from ..methods.base import Batch, Context, Method, PlannedData, eval_mode, example_nll

log = logging.getLogger("tether")

#: collated keys the methods read (`Batch`) and the model's forward must not get
METHOD_KEYS = ("is_replay", "replay_index")


class TetherTrainer(Trainer):
    """A Trainer whose loss is the task loss plus the named terms the active methods return.

    Args:
        methods: active methods by name, in recipe order.
        context: the base `Context`; ``step`` is filled in per call.
        share_prefix: run the prompt prefix a batch's task rows (and, apart, its replay rows) share
            once per batch (`tether.prefix`), where that is exact: no dropout, no gradient
            checkpointing, one process. ``None``: only on a CPU, where it was measured (on a GPU a
            small model's step is bound by kernel launches, which the extra forward calls add to).
            Methods see the grouping as `Batch.prefix_groups`. Where only dropout keeps the
            student's rows whole, a reference model's forward (eval mode: no dropout) may still share:
            methods with a reference see that grouping as `Batch.teacher_prefix_groups`.
    """

    def __init__(self, *args: Any, methods: dict[str, Method], context: Context, share_prefix: bool | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.methods = methods
        self.base_context = context
        self.share_prefix = share_prefix
        self._prefix: dict[str, Any] = {}  # per model: whether sharing is exact for it, its cache keyword
        self._term_sums: dict[str, Any] = defaultdict(float)  # tensors once a term is added
        self._term_counts: dict[str, Any] = defaultdict(int)
        self._last_terms: dict[str, torch.Tensor] = {}  # the last step's extra loss terms, read only on a NaN
        self.add_callback(_MethodHooks(self))
        if self.pop_callback(ProgressCallback) is not None:  # the bar, with short log lines (all in metrics.jsonl)
            self.add_callback(CompactProgress)

    def context(self) -> Context:
        return dataclasses.replace(self.base_context, step=self.state.global_step)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """HF's step (forward and backward), then the finiteness check before the optimizer's update: the
        loss is read back here anyway by HF's ``logging_nan_inf_filter``, so this adds no device sync."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        _check_finite(loss, self._last_terms, self.state.global_step, self.args.output_dir)
        return loss

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:
            drop_amp_forward(self.model)

    def create_optimizer(self, model=None):
        """HF's optimizer, with per-parameter learning rates when a method scales some (LoRA+).

        HF builds the optimizer (class and kwargs from ``args.optim``, weight-decay and device-mesh
        groups); before its first step each group is split by scale, in place, into groups with the
        same settings and the learning rate multiplied.
        """
        model = model if model is not None else self.model
        if self.optimizer is not None:
            return self.optimizer
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        scales = {id(p): math.prod(float(m.lr_scale(n, p)) for m in self.methods.values()) for n, p in named}
        optimizer = super().create_optimizer(model)
        if all(v == 1.0 for v in scales.values()):
            return optimizer
        if not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer_dict"):
            raise ValueError(f"per-parameter learning rates (lora.lr_ratio) need one torch optimizer over all "
                             f"parameters; HF's optim={self.args.optim!r} built {type(optimizer).__name__}")
        groups = []
        for group in optimizer.param_groups:
            by_scale: dict[float, list] = defaultdict(list)
            for p in group["params"]:
                by_scale[scales.get(id(p), 1.0)].append(p)
            settings = {k: v for k, v in group.items() if k != "params"}
            groups += [{**settings, "params": ps, "lr": settings["lr"] * k} for k, ps in by_scale.items()]
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def get_train_dataloader(self):
        """Honour a dataset's fixed batch plan (replay's exact per-batch ratio) instead of shuffling."""
        ds = self.train_dataset
        if not isinstance(ds, PlannedData):
            return super().get_train_dataloader()
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=ds.batches, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        for_methods = {k: inputs.pop(k) for k in METHOD_KEYS if k in inputs}
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        ctx = self.context()
        batch = Batch.from_inputs({**inputs, **for_methods})
        groups = self._prefix_groups(model, batch)
        teacher_groups = None
        if groups is None and ctx.reference is not None:
            teacher_groups = self._teacher_prefix_groups(model, batch)
        batch = dataclasses.replace(batch, prefix_groups=groups, teacher_prefix_groups=teacher_groups)
        weights = self._example_weights(batch, ctx)
        nll = None  # per-example (NLL sum, target count), when the loss is computed here
        scaled = self._loss_already_scaled(num_items_in_batch)
        if weights is None and groups is None:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        else:
            if groups is None:
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            else:
                outputs = CausalLMOutputWithPast(logits=prefix.forward(
                    model, batch.input_ids, batch.attention_mask, groups, self._prefix["keyword"]))
            nll = example_nll(outputs.logits, batch.labels)
            if weights is not None:
                loss = _weighted_mean(*nll, weights)
                if scaled:
                    loss = loss / self.current_gradient_accumulation_steps  # a per-micro-batch mean
            else:  # what the model's own loss would be: a token mean, or a sum over the accumulated batch's tokens
                loss = nll[0].sum() / (num_items_in_batch if scaled else nll[1].sum())
        terms: dict[str, torch.Tensor] = {}
        for name, method in self.methods.items():
            for key, value in method.extra_loss(model, batch, outputs, ctx).items():
                terms[key if key == name or key.startswith(name) else f"{name}_{key}"] = value
        if terms:
            extra = torch.stack([t.to(loss.dtype) for t in terms.values()]).sum()
            if scaled:
                # the task loss was normalised over the whole accumulated batch; the Trainer will not
                # divide again, so extra terms must be divided here to weigh the same at any accumulation
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
        self._record(terms, batch, outputs, nll)
        self._last_terms = terms
        return (loss, outputs) if return_outputs else loss

    def _prefix_groups(self, model, batch: Batch) -> list[prefix.Group] | None:
        """This batch's `prefix.plan` where sharing is on, exact for this model and saves work; else None."""
        if self.share_prefix is False:
            return None
        state = self._prefix
        if state.get("model") is not model:
            state.clear()
            state.update(model=model, keyword=prefix.cache_keyword(model), why=self._why_not_share(model),
                         teacher_why=self._why_not_share(model, dropout=False))
            if state["why"]:
                log.info("shared prefix: off (%s)", state["why"])
        if state["why"]:
            return None
        ids, mask = batch.input_ids, batch.attention_mask
        groups = prefix.plan(ids, mask, batch.is_replay)
        if not prefix.saves(groups, ids.shape[1]):
            if state.get("checked"):
                self._add("prefix_saved", torch.tensor(0.0))  # a batch run whole: nothing saved
            return None
        if not state.get("checked"):  # once per model: the cached forward must give the plain logits
            state["checked"] = True
            why = self._cached_forward_fails(model, ids, mask, groups)
            if why:
                state["why"] = state["teacher_why"] = why
                log.info("shared prefix: off (%s)", why)
                return None
            log.info("shared prefix: on; first batch: %s", ", ".join(
                f"{len(g.rows)} rows share {g.shared} tokens" for g in groups if g.shared))
        self._add("prefix_saved", torch.tensor(1.0 - prefix.positions(groups) / ids.numel()))
        return groups

    def _teacher_prefix_groups(self, model, batch: Batch) -> list[prefix.Group] | None:
        """Where only dropout keeps the student's rows whole: this batch's `prefix.plan` for forwards of
        the model in eval mode (LwF's teacher), which dropout does not touch; else None."""
        state = self._prefix
        if self.share_prefix is False or not state.get("why") or state.get("teacher_why"):
            return None  # the student shares (its groups serve the teacher too), or neither may
        ids, mask = batch.input_ids, batch.attention_mask
        groups = prefix.plan(ids, mask, batch.is_replay)
        if not prefix.saves(groups, ids.shape[1]):
            return None
        if not state.get("teacher_checked"):  # once per model, in eval mode: no dropout, as the teacher runs
            state["teacher_checked"] = True
            with eval_mode(list(model.modules())):
                why = self._cached_forward_fails(model, ids, mask, groups)
            if why:
                state["teacher_why"] = why
                log.info("shared prefix: off for the reference model's forwards too (%s)", why)
                return None
            log.info("shared prefix: on for the reference model's forwards only (the student's rows run whole: %s)",
                     state["why"])
        self._add("teacher_prefix_saved", torch.tensor(1.0 - prefix.positions(groups) / ids.numel()))
        return groups

    def _cached_forward_fails(self, model, ids, mask, groups) -> str | None:
        """Why the grouped forward does not give this model's plain logits on this batch, or None."""
        try:
            # an architecture property: checked in the weights' own precision, not under mixed
            # precision's autocast (bf16 rounding alone moves SmolLM2's logits ~9% of their spread)
            with native_forward(model), torch.autocast(ids.device.type, enabled=False):
                agrees = prefix.agrees(model, ids, mask, groups, self._prefix["keyword"])
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as e:
            # a model whose forward refuses a prefix cache here (another cache class, say): train it plainly
            return f"its cached forward failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        return None if agrees else "its cached forward differs from the plain one"

    def _why_not_share(self, model, dropout: bool = True) -> str | None:
        """Why sharing a prefix would not be exact (or not possible) for this model in this run, or None.
        ``dropout=False``: for forwards in eval mode, which dropout does not touch."""
        a = self.args
        device = next(model.parameters()).device
        if self.share_prefix is None and device.type != "cpu":
            return (f"not yet measured on {device.type}: training.share_prefix: true turns it on "
                    "(bench/step_overhead.py times both)")
        if prefix.cache_keyword(model) is None:
            return "the model's forward takes no KV cache"
        if a.gradient_checkpointing:
            return "gradient checkpointing turns the KV cache off"
        if self.accelerator.num_processes > 1 or a.n_gpu > 1 or self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return "a distributed run: every process runs its rows whole"
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return "a custom loss"
        if not dropout:
            return None
        if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
            return "dropout is on: one mask would serve every row's prefix"
        config = getattr(model, "config", None)
        rates = {k: v for k, v in (vars(config) if config is not None else {}).items()
                 if "dropout" in k and isinstance(v, float) and v > 0}
        if rates:
            return f"the model's config sets {', '.join(sorted(rates))}"
        return None

    def _example_weights(self, batch: Batch, ctx: Context) -> torch.Tensor | None:
        weights = None
        for method in self.methods.values():
            w = method.example_weights(batch, ctx)
            if w is not None:
                weights = w if weights is None else weights * w
        return weights

    def _loss_already_scaled(self, num_items_in_batch) -> bool:
        scaled = getattr(self, "loss_is_scaled_for_ga", None)  # a Trainer attribute since transformers 5.2x
        if scaled is not None:
            return bool(scaled)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func)

    @torch.no_grad()
    def _record(self, terms: dict[str, torch.Tensor], batch: Batch, outputs, nll=None) -> None:
        """Accumulate the logged terms as tensors, without reading them back: a ``float()`` here
        would make the host wait for the forward pass mid-step, every step (read once per log)."""
        for k, v in terms.items():
            self._add(k, v.detach().float())
        if batch.is_replay is None:
            return
        # split the task loss into task and replay parts for the log (no extra forward pass)
        sums, counts = (t.detach() for t in nll) if nll is not None else example_nll(outputs.logits, batch.labels)
        replay = batch.is_replay.to(counts.device)
        for name, sel in (("loss_task", ~replay), ("loss_replay", replay)):
            denom = (counts * sel).sum()
            present = (denom > 0).float()  # a batch without such rows does not count
            self._add(name, (sums * sel).sum() / denom.clamp_min(1.0) * present, present)
        self._add("replay_fraction", replay.float().mean())

    def _add(self, key: str, value: torch.Tensor, count: torch.Tensor | int = 1) -> None:
        self._term_sums[key] = self._term_sums[key] + value
        self._term_counts[key] = self._term_counts[key] + count

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: add what accumulated since the last one
            for k, total in self._term_sums.items():
                count = float(self._term_counts[k])
                if count > 0:
                    logs[k] = float(total) / count
            self._term_sums.clear()
            self._term_counts.clear()
            for name, method in self.methods.items():
                for k, v in method.metrics().items():
                    logs[f"{name}/{k}"] = v
        super().log(logs, *args, **kwargs)


def drop_amp_forward(model) -> None:
    """Give ``model`` back its own ``forward`` after bf16/fp16 training.

    Why: Accelerate wraps ``model.forward`` in autocast for mixed precision and leaves it there, so
    the trained model (final probes, `train(keep_model=True)`, the next task of a sequence, which
    would wrap it again) kept running in bf16 while the base was scored in its own dtype.
    Accelerate's ``unwrap_model(model, keep_fp32_wrapper=False)`` undoes the wrapper too, but
    rebinds the unwrapped function as an instance attribute; this restores the class's method.
    """
    original = model.__dict__.pop("_original_forward", None)
    if original is None:
        return
    if getattr(original, "__func__", None) is getattr(type(model), "forward", None):
        model.__dict__.pop("forward", None)  # the class's own method again
    else:
        model.forward = original


@contextlib.contextmanager
def native_forward(model) -> Iterator[Any]:
    """Run ``model`` without Accelerate's mixed-precision autocast for a block (the guard's checks:
    scored like the base was, in the model's own dtype), then put the training forward back."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield model
        return
    patched = model.__dict__.get("forward")
    model.forward = original
    try:
        yield model
    finally:
        if patched is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = patched


def weighted_example_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w_i · mean_t nll_{i,t} / Σ_i w_i`` over examples with target tokens (next-token shift).

    Why: HF's per-token mean lets a 100-token replay answer outweigh a one-word task label 30 to 1;
    averaging within each example first makes the loss share of each example what its weight says.
    """
    return _weighted_mean(*example_nll(logits, labels), weights)


def _weighted_mean(sums: torch.Tensor, counts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    w = weights.to(sums.device, sums.dtype) * (counts > 0).to(sums.dtype)
    return (sums / counts.clamp_min(1.0) * w).sum() / w.sum().clamp_min(torch.finfo(sums.dtype).tiny)


def training_arguments(t, output_dir: str):
    """`TrainingSpec` -> HF `TrainingArguments` (the one place the mapping lives)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir, max_steps=t.max_steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        data_seed=t.seed, bf16=t.bf16, fp16=t.fp16, logging_steps=t.logging_steps, report_to=t.report_to,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        **({"gradient_checkpointing": True} if t.gradient_checkpointing else {}),
    )


def as_dataset(data: Any) -> Any:
    """A method-prepared dataset as is; a plain list of `Example`s as dicts the collator takes."""
    if isinstance(data, list):
        return [{"input_ids": e.input_ids, "labels": e.labels} if hasattr(e, "input_ids") else e for e in data]
    return data


_NOT_TERMS = {"loss", "grad_norm", "learning_rate", "epoch", "prefix_saved", "teacher_prefix_saved",
              "replay_fraction", "total_flos"}


def compact_line(step: int, max_steps: int, logs: dict[str, Any]) -> str:
    """One log as a short line: ``step 5/40  loss 1.111 (task 1.246, replayed 2.399)  lwf_inputs 0.138  grad 18.7
    lr 1e-04``; guard checks as ``guard: worst drop 0.7%, within budget``; the end as ``done: ...``."""
    if "train_runtime" in logs:
        loss = logs.get("train_loss", float("nan"))
        return f"done: {step} steps in {logs['train_runtime']:.0f} s, train_loss {loss:.4g}"
    if "guard/worst_drop" in logs:
        verdict = "BREACHED" if logs.get("guard/breached") else "within budget"
        task = f", task {logs['guard/task_score']:.3g}" if "guard/task_score" in logs else ""
        return f"step {step}/{max_steps}  guard: worst drop {logs['guard/worst_drop']:.1%}, {verdict}{task}"
    parts = [f"step {step}/{max_steps}"]
    if "loss" in logs:
        parts_of = (("loss_task", "task"), ("loss_replay", "replayed"))
        split = [f"{name} {logs[k]:.4g}" for k, name in parts_of if k in logs]
        parts.append(f"loss {logs['loss']:.4g}" + (f" ({', '.join(split)})" if split else ""))
    parts += [f"{k} {v:.3g}" for k, v in logs.items()
              if isinstance(v, (int, float)) and "/" not in k and not k.startswith("loss") and k not in _NOT_TERMS]
    if "grad_norm" in logs:
        parts.append(f"grad {logs['grad_norm']:.3g}")
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.1e}")
    return "  ".join(parts)


class CompactProgress(ProgressCallback):
    """HF's progress bar, writing one short line per log instead of the raw metric dictionary."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(compact_line(state.global_step, state.max_steps, logs))


class JsonlMetrics(TrainerCallback):
    """Writes every log line to a JSONL file (``extra`` fields, e.g. the task index, on each line)."""

    def __init__(self, path, extra: dict | None = None):
        self.path, self.extra = path, extra or {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            from ..io import append_jsonl

            append_jsonl(self.path, {**self.extra, "step": state.global_step, **logs})


class _MethodHooks(TrainerCallback):
    """Calls `before_optimizer_step` on every method (gradient projection, masking); no checkpoint at the
    last step unless it falls on ``save_steps``."""

    def __init__(self, trainer: TetherTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        # HF also checkpoints the last step; a run saves its model there anyway, so only every
        # save_steps (a full model's checkpoint with its optimizer is three times its size on disk)
        if state.global_step >= state.max_steps and args.save_steps and state.global_step % args.save_steps:
            control.should_save = False
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        ctx = self.trainer.context()
        for method in self.trainer.methods.values():
            method.before_optimizer_step(self.trainer.model, ctx)


class TrainingDiverged(ValueError):
    """The loss stopped being a number: the run stops before the optimizer writes NaN into the weights."""


def _check_finite(loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int, output_dir: str) -> None:
    """Stop on a NaN or infinite loss before the optimizer applies it: the weights stay as the last step
    left them and the checkpoints already saved stay on disk; the message names the term that went bad."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    what = f"the {', '.join(bad)} term" if bad else "the task loss"
    ckpts = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    kept = f"last checkpoint kept: {ckpts[-1]}" if ckpts else "no checkpoint saved yet"
    raise TrainingDiverged(f"step {step + 1}: loss is {loss.item()} ({what}); stopped before the update, {kept}; "
                           "lower training.lr or check the data")
