"""Distillation maths on logits: the temperature-scaled KL and where it is taken (LwF's kernels).

Pure functions of tensors, no model and no method state, so each is checked on its own against a
plain autograd formula (tests/test_lwf.py).
"""

from __future__ import annotations

import torch

from ..data.formats import IGNORE_INDEX


def _softmax_lse(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax(x/T)``, ``logsumexp(x/T)`` per row and ``x/T``, with a single ``exp`` pass."""
    scaled = logits.float() / temperature
    peak = scaled.amax(dim=-1, keepdim=True)
    e = (scaled - peak).exp_()
    z = e.sum(dim=-1, keepdim=True)
    return e.div_(z), (peak + z.log()).squeeze(-1), scaled


class _DistilKL(torch.autograd.Function):
    """``T² · Σ_r w_r KL(softmax(t_r/T) || softmax(s_r/T))`` over ``[R, V]`` logits, in chunks: over
    ``rows`` (every row when ``None``), weighted by ``weights`` (1 when ``None``).

    Why not ``F.kl_div`` on log-softmaxes: on a 49k vocabulary that materialises five full
    ``[B, L, V]`` float32 tensors forward and as many backward, which together cost about as much as
    the teacher's forward pass. Here a few rows at a time are reduced while they sit in cache, and
    the gradient ``T · (softmax(s/T) - softmax(t/T))`` is written once, so backward is one multiply.
    """

    @staticmethod
    def forward(ctx, student, teacher, rows: torch.Tensor | None, weights: torch.Tensor | None,
                temperature: float, chunk: int):
        grad = torch.zeros(student.shape, dtype=torch.float32, device=student.device)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        n = student.shape[0] if rows is None else rows.numel()
        for i in range(0, n, chunk):
            if rows is None:
                s_rows, t_rows = student[i:i + chunk], teacher[i:i + chunk]
            else:
                idx = rows[i:i + chunk]
                s_rows, t_rows = student.index_select(0, idx), teacher.index_select(0, idx)
            # one exp per element per side: KL_row = Σ p·(t - s)/T - lse(t/T) + lse(s/T)
            p, lse_p, t_scaled = _softmax_lse(t_rows, temperature)
            q, lse_q, s_scaled = _softmax_lse(s_rows, temperature)
            kl = (p * t_scaled.sub_(s_scaled)).sum(-1) - lse_p + lse_q
            g = q.sub_(p).mul_(temperature)
            if weights is not None:
                kl = kl * weights[i:i + chunk]
                g.mul_(weights[i:i + chunk, None])
            total += kl.sum()
            if rows is None:
                grad[i:i + chunk] = g
            else:
                grad.index_copy_(0, idx, g)
        ctx.save_for_backward(grad)
        ctx.student_dtype = student.dtype
        return total * (temperature * temperature)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.student_dtype), None, None, None, None, None


def lwf_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
           temperature: float, chunk: int | None = None, gather: bool | None = None) -> torch.Tensor:
    """``T² · mean over mask`` of ``KL(softmax(teacher/T) || softmax(student/T))``; [B, L, V] inputs.

    In float32; the teacher is detached, so only the student gets a gradient. ``chunk`` rows are
    reduced at a time: by default 8 on a CPU (they stay in cache) and ~32M logits' worth elsewhere,
    where the kernel count is what costs (8 rows at a time was ~1,000 kernel launches for one batch
    of 8 x 94 tokens). ``gather`` (default: on a CPU) computes only the unmasked rows; finding them
    makes the host wait for the GPU, so there every row is computed and masked rows weigh 0.
    """
    vocab = student_logits.shape[-1]
    cpu = student_logits.device.type == "cpu"
    if chunk is None:
        chunk = 8 if cpu else max(8, (1 << 25) // vocab)
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    gather = cpu if gather is None else gather
    rows = weights = None
    if mask is None:
        count = student.shape[0]
    elif gather:
        rows = mask.reshape(-1).nonzero().squeeze(-1).to(student.device)
        count = rows.numel()
        if count == 0:
            return student_logits.sum() * 0.0
    else:
        weights = mask.reshape(-1).to(student.device, torch.float32)
        count = weights.sum().clamp_min(1.0)
    return _DistilKL.apply(student, teacher, rows, weights, float(temperature), chunk) / count


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: at position ``t`` the label of token ``t + 1``, the one its logits predict (``IGNORE_INDEX``
    at the last position)."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def nontarget_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 rows: torch.Tensor | None, temperature: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``T² · mean`` over the positions predicting a target token of ``rows`` (every row when ``None``)
    of ``KL(p̂ || q̂)``, where ``p̂``, ``q̂`` are ``softmax(teacher/T)``, ``softmax(student/T)`` with the
    target token and the ``exclude`` ids removed and the rest renormalised. Those logits get no
    gradient: the term is blind to how sure the model is of the answer and sees only how it ranks
    the alternatives."""
    vocab = student_logits.shape[-1]
    target = next_labels(labels)
    predicts = target != IGNORE_INDEX
    if rows is not None:
        predicts &= rows.to(labels.device, torch.bool)[:, None]
    idx = predicts.reshape(-1).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return student_logits.sum() * 0.0
    target = target.reshape(-1)[idx].to(student_logits.device)[:, None]
    idx = idx.to(student_logits.device)
    s = student_logits.reshape(-1, vocab).index_select(0, idx).float() / temperature
    t = teacher_logits.detach().reshape(-1, vocab).index_select(0, idx).float() / temperature
    # a finite floor, not -inf: the target's probability underflows to exactly 0 and 0 * finite stays 0
    s = s.scatter(1, target, -1e9)
    t = t.scatter(1, target, -1e9)
    if exclude is not None and exclude.numel():
        cols = exclude.to(s.device)
        s, t = s.index_fill(1, cols, -1e9), t.index_fill(1, cols, -1e9)
    logp, logq = t.log_softmax(-1), s.log_softmax(-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl.mean() * (temperature * temperature)


def untrained_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor | None,
                        is_replay: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L]`` bool: the non-padding positions whose next token the task loss does not train.

    Logits at position ``t`` predict token ``t + 1``, so a position is excluded when ``labels[t + 1]``
    is a target, except on replay rows (``is_replay``), which are kept whole: their targets are
    general text the base model should go on predicting as it did.
    """
    keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if labels is None:
        return keep
    predicts_target = next_labels(labels) != IGNORE_INDEX
    if is_replay is not None:
        predicts_target &= ~is_replay.to(input_ids.device)[:, None]
    return keep & ~predicts_target
