"""Where did fine-tuning change the model? Per-block weight change, representation similarity, drift.

Three views of the same question, cheapest first: the relative Frobenius change of each decoder
block's weights; linear CKA (Kornblith et al., "Similarity of Neural Network Representations
Revisited", https://arxiv.org/abs/1905.00414) between the base and tuned outputs of each block on
general prompts; and the drift of the final next-token distribution, ``KL(p_base || p_tuned)``.
Blocks at the bottom that barely moved can be frozen for free; the verdict becomes a recipe line.

A PEFT (LoRA) tuned model is read through its effective weights ``W + scaling * B A``
(`get_delta_weight`), never merged in place; with ``base_model=None`` its adapter-disabled view is
the base, so one copy of the weights serves both sides.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path
from ..models import adapter_layers, adapters_off, find_blocks, is_peft_model

GROUPS = ("attn", "mlp", "norm", "other")


@dataclass
class BlockDiagnosis:
    """One decoder block: ``weight_change = ||W_t - W_b||_F / ||W_b||_F`` over all its parameters
    (``group_change`` per attn/mlp/norm/other) and the linear CKA of its outputs (1 = unchanged)."""

    index: int
    weight_change: float
    group_change: dict[str, float]
    cka: float
    n_params: int


@dataclass
class Diagnosis:
    """Per-block change, output drift, and a freezing suggestion to paste into a recipe.

    Attributes:
        blocks: one entry per decoder block, bottom (input side) first.
        block_prefix: the block list's parameter-name prefix (``model.layers``).
        outside_change: relative weight change of everything outside the blocks (embeddings,
            final norm, output head).
        kl: mean ``KL(p_base || p_tuned)`` of the next-token distribution, in nats per token.
        n_prompts, n_tokens: prompts and non-pad tokens the CKA and KL were measured on.
        suggestion: a sentence saying what to do and why.
        recipe: a ``methods:`` snippet (``{"freeze": {"fraction": 0.4}}``) or ``None``.
    """

    blocks: list[BlockDiagnosis]
    block_prefix: str
    outside_change: float
    kl: float
    n_prompts: int
    n_tokens: int
    suggestion: str
    recipe: dict[str, Any] | None

    @property
    def recipe_yaml(self) -> str:
        import yaml

        return yaml.safe_dump({"methods": self.recipe}, sort_keys=False) if self.recipe else ""

    def to_dict(self) -> dict[str, Any]:
        """JSON for ``diagnose.json`` (the schema `tether report` reads)."""
        d = asdict(self)
        for b in d["blocks"]:
            b["attn_change"] = b["group_change"].get("attn")
            b["mlp_change"] = b["group_change"].get("mlp")
        d["suggestion"] = {"text": self.suggestion, "recipe": self.recipe, "recipe_yaml": self.recipe_yaml}
        return d

    def render_table(self, title: str = "Where the fine-tune changed the model"):
        from rich.table import Table

        groups = [g for g in GROUPS if any(g in b.group_change for b in self.blocks)]
        table = Table(title=title, caption=f"next-token KL(base||tuned) = {self.kl:.4g} nats/token over "
                      f"{self.n_tokens} tokens; weights outside the blocks changed {self.outside_change:.3%}")
        for col in ("block", "weight Δ", *(f"{g} Δ" for g in groups), "CKA", "1 - CKA"):
            table.add_column(col, justify="right")
        top = max(range(len(self.blocks)), key=lambda i: self.blocks[i].weight_change, default=None)
        for b in self.blocks:
            mark = "[bold]" if b.index == top else ""
            table.add_row(f"{mark}{b.index}", f"{mark}{b.weight_change:.3%}",
                          *(f"{b.group_change[g]:.3%}" if g in b.group_change else "-" for g in groups),
                          f"{b.cka:.4f}", f"{1 - b.cka:.2e}")
        return table

    def plot(self, path: str | Path) -> Path:
        """PNG with bars of per-block weight change and 1 - CKA, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        idx = [b.index for b in self.blocks]
        fig, (ax1, ax2) = plt.subplots(2, 1, sharex=True, figsize=(max(6, 0.3 * len(idx)), 5))
        ax1.bar(idx, [100 * b.weight_change for b in self.blocks], color="tab:blue")
        ax1.set_ylabel("weight change (%)")
        ax1.set_title(f"per-block change; next-token KL = {self.kl:.3g} nats/token")
        ax2.bar(idx, [1 - b.cka for b in self.blocks], color="tab:orange")
        ax2.set_ylabel("1 - CKA")
        ax2.set_xlabel("block (input side first)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)
        plt.close(fig)
        return Path(path)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of ``[n, d]`` features: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``, columns
    centred, in float64. Invariant to rotations and isotropic scaling; 1 for identical features."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def param_group(name: str) -> str:
    n = name.lower()
    if "attn" in n or "attention" in n:
        return "attn"
    if any(k in n for k in ("mlp", "ffn", "feed_forward", "experts")):
        return "mlp"
    if "norm" in n or re.search(r"(^|\.)ln", n):
        return "norm"
    return "other"


def freeze_fraction(k: int, n: int) -> float:
    """The shortest decimal ``f`` with ``int(f * n) == k``, as the freeze method counts blocks."""
    for digits in range(1, 7):
        f = math.ceil(k / n * 10**digits) / 10**digits
        if int(f * n) == k and f < 1:
            return f
    return (k + 0.5) / n


def suggest(weight_change: Sequence[float], cka: Sequence[float], *, block_prefix: str = "model.layers",
            low: float = 0.1, cka_tol: float = 0.01) -> tuple[str, dict[str, Any] | None]:
    """Turn per-block change into advice and a ``methods:`` snippet.

    A block *barely moved* when its weight change is at most ``low`` times the largest block's and
    ``1 - CKA <= cka_tol``. If the bottom ``k >= 1`` blocks all barely moved, freeze them: they
    keep their general features exactly and the task loses nothing it used. Otherwise name the
    block that moved most, as a target for freezing if forgetting shows up.
    """
    if not 0 <= low < 1:
        raise ValueError("suggest: low must be in [0, 1)")
    n = len(weight_change)
    top = max(range(n), key=lambda i: weight_change[i])
    wmax = weight_change[top]
    if wmax == 0:
        return "No block's weights changed: nothing to freeze.", None
    k = 0
    while k < n and weight_change[k] <= low * wmax and 1 - cka[k] <= cka_tol:
        k += 1
    if k >= 1:
        f = freeze_fraction(k, n)
        return (f"Blocks 0-{k - 1} of {n} barely moved (weight change <= {low:.0%} of the largest, "
                f"CKA >= {1 - cka_tol:.2f}); the change starts at block {k} and peaks at block {top}. "
                f"Freeze the bottom {k} blocks (add to your recipe's methods):"), {"freeze": {"fraction": f}}
    pattern = rf"{re.escape(block_prefix)}\.{top}\."
    return (f"Every block moved; block {top} most ({wmax:.2%} relative weight change, CKA {cka[top]:.4f}). "
            f"If the general probes show forgetting, freeze it (add to your recipe's methods):"), \
        {"freeze": {"patterns": [pattern]}}


def _tuner_layers(model):
    """``(name, layer, plain)`` per PEFT tuner layer; ``plain``: LoRA without a variant (DoRA...)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, mod in model.named_modules():
        if isinstance(mod, BaseTunerLayer):
            if mod.merged:
                raise ValueError(f"diagnose: {name} has a merged adapter; call unmerge_adapter() first")
            yield name, mod, isinstance(mod, LoraLayer) and not getattr(mod, "lora_variant", {})


def effective_weights(model, *, adapters: bool = True) -> tuple[torch.nn.Module, dict[str, Callable]]:
    """The weights a forward pass uses, by plain-model parameter name, each computed on demand.

    For a PEFT LoRA model, ``name.base_layer.weight`` becomes ``name.weight`` and, with ``adapters``,
    gains ``scaling * B A`` of each active adapter: nothing is merged in place and only one weight
    is materialised at a time.
    """
    peft = is_peft_model(model)
    root = model.get_base_model() if peft else model
    params = {n.replace(".base_layer", ""): p for n, p in root.named_parameters() if "lora_" not in n}
    deltas: dict[str, tuple[Any, list[str]]] = {}
    for mname, mod, _ in _tuner_layers(root) if peft and adapters else ():
        active = [a for a in mod.active_adapters if a in mod.lora_A or a in mod.lora_embedding_A]
        if active and not mod.disable_adapters:
            deltas[f"{mname}.weight"] = (mod, active)

    def getter(name: str, p: torch.Tensor) -> Callable[[], torch.Tensor]:
        def get() -> torch.Tensor:
            mod, active = deltas.get(name, (None, []))
            w = p.detach()
            return w + sum(mod.get_delta_weight(a).to(w.dtype) for a in active) if active else w
        return get

    return root, {n: getter(n, p) for n, p in params.items()}


def _weight_stats(base_model, tuned_model, base_adapters: bool) -> tuple[str, list[dict], float]:
    """Per block ``{group: [sum ||dW||^2, sum ||W||^2, numel]}``, the block prefix, outside change."""
    base_root, base_w = effective_weights(base_model, adapters=base_adapters)
    _, tuned_w = effective_weights(tuned_model, adapters=True)
    if base_w.keys() != tuned_w.keys():
        diff = sorted(base_w.keys() ^ tuned_w.keys())[:5]
        raise ValueError(f"diagnose: base and tuned models have different parameters (e.g. {diff})")
    prefix, blocks = find_blocks(base_root)
    stats: list[dict[str, list[float]]] = [{} for _ in blocks]
    outside = [0.0, 0.0, 0]
    pat = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    with torch.no_grad():
        for name, get_b in base_w.items():
            b, t = get_b(), tuned_w[name]()
            if b.shape != t.shape:
                raise ValueError(f"diagnose: {name} is {tuple(b.shape)} in the base, {tuple(t.shape)} tuned")
            m = pat.match(name)
            acc = stats[int(m.group(1))].setdefault(param_group(m.group(2)), [0.0, 0.0, 0]) if m else outside
            w = float(torch.linalg.vector_norm(b)) ** 2
            same = t.data_ptr() == b.data_ptr() and t.device == b.device  # shared by a PEFT base view
            acc[0] += 0.0 if same else float(torch.linalg.vector_norm(t - b.to(t.device))) ** 2
            acc[1] += w
            acc[2] += b.numel()
    return prefix, stats, _rel(outside[0], outside[1])


def _rel(d2: float, w2: float) -> float:
    return math.sqrt(d2 / w2) if w2 > 0 else (0.0 if d2 == 0 else math.inf)


@contextlib.contextmanager
def _inference(*models):
    """eval() + no_grad, then every module's own train flag back (a model may be mid-training)."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was in modes:
            m.training = was


def _run(model, ids, mask, keep_cka, base_view: bool, layers=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Block outputs at CKA positions (float32, CPU) and log-probs at non-pad positions; ``base_view``:
    with the adapters off (``layers``: `models.adapter_layers`, so no flag of the model changes)."""
    _, blocks = find_blocks(model)
    outs: list[torch.Tensor] = [torch.empty(0)] * len(blocks)

    def hook(i):
        def f(_mod, _args, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            outs[i] = h[keep_cka.to(h.device)].float().cpu()
        return f

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    dev = next(model.parameters()).device
    try:
        with adapters_off(model, layers) if base_view else contextlib.nullcontext():
            logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
    finally:
        for h in handles:
            h.remove()
    return outs, torch.log_softmax(logits[mask.bool().to(dev)].float(), dim=-1).cpu()


def diagnose(base_model, tuned_model, tokenizer, prompts: Sequence[str | list[dict]], *, batch_size: int = 8,
             max_length: int = 256, skip_first_token: bool = True, low: float = 0.1,
             cka_tol: float = 0.01) -> Diagnosis:
    """Compare a base and a tuned model block by block.

    Args:
        base_model: the model before fine-tuning; ``None`` when ``tuned_model`` is PEFT-wrapped
            (its adapter-disabled view is the base).
        tuned_model: the fine-tuned model, plain or PEFT-wrapped; never modified.
        tokenizer: shared tokenizer.
        prompts: general prompts, strings (tokenised as is) or chat message lists (chat template).
        batch_size: prompts per forward pass; max_length: tokens kept per prompt.
        skip_first_token: leave each sequence's first position out of CKA: it attends only to
            itself and its huge-norm "attention sink" state would dominate the linear kernel.
        low, cka_tol: thresholds of `suggest`.
    """
    from ..probes.generation import encode_prompt

    if not prompts:
        raise ValueError("diagnose: give at least one prompt")
    if base_model is None and not is_peft_model(tuned_model):
        raise ValueError("diagnose: base_model is needed unless the tuned model is PEFT-wrapped")
    base_view = tuned_model if base_model is None else base_model  # adapters off when it is the tuned one
    if is_peft_model(tuned_model) and not all(plain for *_, plain in _tuner_layers(tuned_model)):
        # non-LoRA tuners, DoRA...: no closed-form delta here, so read weights from merged copies
        w_base = base_model if base_model is not None else copy.deepcopy(tuned_model).unload()
        prefix, stats, outside = _weight_stats(w_base, copy.deepcopy(tuned_model).merge_and_unload(), True)
        del w_base
    else:
        prefix, stats, outside = _weight_stats(base_view, tuned_model, base_model is not None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    seqs = [encode_prompt(tokenizer, p, None)[:max_length] for p in prompts]
    feats: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in stats]
    kl_sum, n_tok = 0.0, 0
    off_layers = adapter_layers(tuned_model) if base_model is None else None
    with _inference(base_view, tuned_model):
        for start in range(0, len(seqs), batch_size):
            batch = seqs[start:start + batch_size]
            ids = torch.full((len(batch), max(map(len, batch))), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                ids[i, :len(s)] = torch.tensor(s)
                mask[i, :len(s)] = 1
            keep = mask.bool().clone()
            if skip_first_token and ids.shape[1] > 1:
                keep[:, 0] = False
            hb, lp_b = _run(base_view, ids, mask, keep, base_model is None, off_layers)
            ht, lp_t = _run(tuned_model, ids, mask, keep, False)
            for (fb, ft), b, t in zip(feats, hb, ht):
                fb.append(b)
                ft.append(t)
            kl_sum += float((lp_b.exp() * (lp_b - lp_t)).sum(-1).clamp_min(0).sum())
            n_tok += lp_b.shape[0]
    blocks = [BlockDiagnosis(
        index=i, weight_change=_rel(sum(g[0] for g in groups.values()), sum(g[1] for g in groups.values())),
        group_change={g: _rel(groups[g][0], groups[g][1]) for g in GROUPS if g in groups},
        cka=linear_cka(torch.cat(feats[i][0]), torch.cat(feats[i][1])),
        n_params=int(sum(g[2] for g in groups.values()))) for i, groups in enumerate(stats)]
    text, recipe = suggest([b.weight_change for b in blocks], [b.cka for b in blocks],
                           block_prefix=prefix, low=low, cka_tol=cka_tol)
    return Diagnosis(blocks=blocks, block_prefix=prefix, outside_change=outside, kl=kl_sum / max(n_tok, 1),
                     n_prompts=len(seqs), n_tokens=n_tok, suggestion=text, recipe=recipe)
