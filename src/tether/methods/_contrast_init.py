"""LoRA's ``init: contrast``: start each ``A`` where the layer's inputs on the task data carry the most
energy relative to the general data.

Like PEFT's EVA (``peft/tuners/lora/eva.py``) it reads layer inputs through forward pre-hooks and
overwrites ``A`` before training; unlike EVA it contrasts two data sets. The choice is documented at
``LoraMethodConfig.init``; here are its maths (second moments, a generalised eigenproblem) and the
passes over the data.
"""

from __future__ import annotations

import random

import torch

from .base import eval_mode

#: bytes of second moments held at once by `lora.init: contrast` (two float64 ``d_in x d_in`` per layer);
#: more layers than fit are done in several passes over the same batches
MOMENT_BYTES = 2 * 2**30


def moment_chunks(layers: dict[str, torch.nn.Module], adapter: str, budget: int | None = None
                  ) -> list[dict[str, torch.nn.Module]]:
    """Consecutive groups of ``layers`` whose task and general moments fit ``budget`` (one layer at least).

    Counts every layer's own matrices, though q/k/v (and gate/up) share one: an 8B model's MLP input
    alone is 14336 wide (1.6 GB per moment), so all of them at once would not fit anywhere.
    """
    budget = MOMENT_BYTES if budget is None else budget
    chunks: list[dict[str, torch.nn.Module]] = [{}]
    used = 0
    for n, m in layers.items():
        cost = 2 * 8 * m.lora_A[adapter].in_features ** 2
        if chunks[-1] and used + cost > budget:
            chunks.append({})
            used = 0
        chunks[-1][n] = m
        used += cost
    return [c for c in chunks if c]


class _Enough(Exception):
    """Raised by the last hooked layer's pre-hook: nothing after it is needed."""


def input_moments(model: torch.nn.Module, layers: dict[str, torch.nn.Module], batches: list[dict],
                  positions: int = 4096) -> tuple[dict[str, torch.Tensor], int]:
    """Each layer's uncentred input second moment ``E[x x^T]`` (float64) over non-padding positions.

    Reads batches until ``positions`` non-padding positions are in (every position of each batch
    read): the forwards and the products cost ``positions * d^2`` per distinct input, and every
    position of 16 batches of long general rows took minutes on a CPU. Layers fed the same tensor
    (q/k/v, gate/up) share one product per batch and one result object, so callers can solve once
    per distinct input. Runs the decoder body only when it can (no output head: a vocabulary-wide
    product per position that no adapted layer reads), and stops each forward at the last hooked
    layer's input (``layers`` in execution order).
    """
    device = next(model.parameters()).device
    group: dict[str, int] = {}  # layer -> index of the input it reads (fixed by the first batch)
    sums: dict[int, torch.Tensor] = {}
    state: dict = {"rows": None, "seen": {}}
    count = 0

    def hook(name):
        def pre(mod, args):
            x = args[0]
            # the tensor is kept alive for the whole forward, so its address names it uniquely
            key = (x.data_ptr(), tuple(x.shape))
            if key not in state["seen"]:
                flat = x.reshape(-1, x.shape[-1])[state["rows"]].float()
                state["seen"][key] = (x, (flat.T @ flat).double(), len(state["seen"]))
            _, g, idx = state["seen"][key]
            if group.setdefault(name, idx) != idx:
                raise RuntimeError(f"lora: {name}'s input changed identity between batches")
            if idx not in state["added"]:
                sums[idx] = sums[idx] + g if idx in sums else g
                state["added"].add(idx)
            if name == last:
                raise _Enough
        return pre

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    run = body if isinstance(body, torch.nn.Module) and not any(
        n.startswith("lm_head") or ".lm_head" in n for n in layers) else model
    last = next(reversed(layers))
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad(), eval_mode(list(model.modules())):
            for b in batches:
                if count >= positions:
                    break
                b = {k: v.to(device) for k, v in b.items()}
                rows = b["attention_mask"].reshape(-1).nonzero().squeeze(1)
                state.update(rows=rows, seen={}, added=set())
                count += len(rows)
                try:
                    run(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                except _Enough:
                    pass
    finally:
        for h in handles:
            h.remove()
    means = {idx: g / max(count, 1) for idx, g in sums.items()}
    return {n: means[idx] for n, idx in group.items()}, count


def contrast_directions(c_task: torch.Tensor, c_general: torch.Tensor, r: int, eps: float = 1e-2) -> torch.Tensor:
    """The ``r`` unit vectors (columns, ``[d, r]``) maximising ``v' C_task v / v' (C_general + eps m I) v``.

    ``m`` is ``C_general``'s mean eigenvalue: the ridge keeps directions neither data set uses
    (ratio 0/0, noise) from winning. Solved as a symmetric eigenproblem after whitening by the
    Cholesky factor of the regularised general moment, in float64.
    """
    d = c_general.shape[0]
    reg = c_general + eps * float(torch.trace(c_general)) / d * torch.eye(d, dtype=c_general.dtype,
                                                                         device=c_general.device)
    chol = torch.linalg.cholesky(reg)
    inv = torch.linalg.solve_triangular(chol, torch.eye(d, dtype=reg.dtype, device=reg.device), upper=False)
    _, vecs = torch.linalg.eigh(inv @ c_task @ inv.T)  # ascending eigenvalues
    v = inv.T @ vecs[:, -r:].flip(-1)
    return (v / v.norm(dim=0, keepdim=True)).to(torch.float32)


def sample_batches(rows: list, collate, size: int, n_batches: int, seed: int) -> list[dict]:
    """At most ``n_batches`` collated batches of ``size`` rows sampled from ``rows`` with ``seed``."""
    picked = random.Random(seed).sample(rows, min(len(rows), size * n_batches))
    return [collate(picked[i:i + size]) for i in range(0, len(picked), size)]


@torch.no_grad()
def set_contrast_directions(model: torch.nn.Module, layers: dict[str, torch.nn.Module], adapter: str,
                            task: list[dict], general: list[dict]) -> dict[str, int]:
    """Set each of ``layers``' ``adapter`` ``A`` to the top ``r`` task-over-general directions of its
    inputs (`contrast_directions`); returns the positions read of each data set."""
    read = {}
    for chunk in moment_chunks(layers, adapter):
        moments = {}
        for what, batches in (("task", task), ("general", general)):
            moments[what], read[what] = input_moments(model, chunk, batches)
        solved: dict[tuple[int, int, int], torch.Tensor] = {}  # layers reading one input share the solve
        for n, mod in chunk.items():
            a = mod.lora_A[adapter].weight
            key = (id(moments["task"][n]), id(moments["general"][n]), a.shape[0])
            if key not in solved:
                solved[key] = contrast_directions(moments["task"][n], moments["general"][n], a.shape[0])
            a.copy_(solved[key].T.to(a.dtype))
    return read
