"""One batched scorer under every probe, on the live in-memory model (lm-eval's ``LM`` interface).

Probes build token-level requests; the `Scorer` batches them. It never copies the model: every call
runs under ``torch.no_grad()`` in ``eval()`` mode and restores each module's previous train/eval
flag afterwards, so the forgetting guard can probe in the middle of training.

Why it is faster than lm-eval's ``HFLM`` on multiple choice: requests sharing a context (the choices
of one item) run the context once; its KV cache is then expanded across the choices and only the
continuation tokens are run. Logits are projected only at the positions that are scored
(``logits_to_keep``), which matters with a 49k vocabulary. A prompt prefix every row of a batch
shares (an instruct model's system prompt and a task's instruction: 37-65% of the demo suite's
chat and generation tokens) runs once, as in training (`tether.prefix`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import sys
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from .. import prefix as prefixes
from ..models import adapter_layers, adapters_off

log = logging.getLogger("tether")

# A forward pass has a fixed cost (every weight is read once): padding is split off into another
# pass only when that saves more than this many tokens (tuned on CPU with bench/eval_speed.py).
_PASS_COST_TOKENS = 64
# Expanded KV cache allowed per batch (rows x context length), in units of max_batch_tokens.
_CACHE_TOKENS_PER_BATCH_TOKEN = 16


def _width_chunks(widths: Sequence[int]) -> list[slice]:
    """Split rows sorted widest first into runs padded together, where a split saves enough padding."""
    out, start = [], 0
    while start < len(widths):
        w0, n = widths[start], len(widths) - start
        saved, cut = max(((w0 - widths[i]) * (len(widths) - i), i) for i in range(start, len(widths)))
        if saved < max(_PASS_COST_TOKENS, w0 * n // 4) or cut <= start:  # cut == start would loop forever
            cut = len(widths)
        out.append(slice(start, cut))
        start = cut
    return out


def _unmerged_lora_layers(model) -> list:
    """PEFT LoRA layers whose active adapters run beside (not inside) their base weights."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # no PEFT, no adapters
        return []
    return [m for m in model.modules()
            if isinstance(m, LoraLayer) and not m.merged and not m.disable_adapters
            and any(a in m.lora_A for a in m.active_adapters)]


class Scorer:
    """Log-likelihoods, completion losses, greedy generations and next-token log-probs of a model.

    Args:
        model: a causal LM, plain or PEFT-wrapped; used in place.
        tokenizer: its tokenizer (pad id, decoding, stop strings).
        batch_size: sequences per forward pass.
        max_length: longest sequence fed to the model; defaults to the model's context length.
        device: where inputs go; defaults to the model's device.
        max_batch_tokens: cap on padded tokens per batch where logits are kept for every position.
        merge_adapters: let `merged` fold LoRA adapters into their base weights for a block of
            scoring; ``None`` (default) does so on CPU only (see `merged`).
        share_prefix: run a batch's shared prompt prefix once (exact: checked once per scorer
            against the plain forward, off for a model whose cached forward differs).
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 32, max_length: int | None = None,
                 device: str | torch.device | None = None, max_batch_tokens: int = 2048,
                 merge_adapters: bool | None = None, share_prefix: bool = True):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 2048
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.max_batch_tokens = max_batch_tokens
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (getattr(tokenizer, "eos_token_id", None) or 0)
        self._adapters_off = False
        self.merge_adapters = self.device.type == "cpu" if merge_adapters is None else bool(merge_adapters)
        # transformers 5.x renamed the forward's `past_key_values` to `cache`
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        keyword = prefixes.cache_keyword(model)
        self._cache_kw = keyword or "past_key_values"
        # 2-D `logits_to_keep` (positions per row, or a bool mask) is transformers' `slice_logits_to_keep`
        # (5.2x); older modeling code indexes `hidden[:, keep, :]` and fails on it: slice afterwards there
        module = sys.modules.get(type(base).__module__)
        self._keep_2d = "logits_to_keep" in params and hasattr(module, "slice_logits_to_keep")
        self._keep = "logits_to_keep" in params
        self.share_prefix = share_prefix and keyword is not None
        self._prefix_exact: dict[str, bool] = {}  # per padding side, from its first shared batch (`_shared`)

    # ----------------------------------------------------------------- plumbing
    @property
    def is_peft(self) -> bool:
        """True for a PEFT ``PeftModel`` or a transformers model with PEFT adapters loaded."""
        if hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config"):
            return True
        return bool(getattr(self.model, "_hf_peft_config_loaded", False))

    @contextlib.contextmanager
    def reference_view(self) -> Iterator[Scorer]:
        """A view of this scorer whose every forward pass runs with the adapters disabled.

        Disabling happens per forward pass, not for the whole block, so the view and the tuned
        scorer can be interleaved (drift zips their outputs) without a second copy of the model.
        Only the flags the adapter layers read are switched (`models.adapters_off`), so a guard check
        leaves every ``requires_grad`` as training set it.
        """
        if not self.is_peft:
            raise TypeError("reference_view() needs a PEFT-wrapped model; for a fully fine-tuned model "
                            "pass a Scorer over the base model as `reference`")
        view = Scorer.__new__(Scorer)
        view.__dict__.update(self.__dict__)
        view._adapters_off = True
        view._adapter_layers = adapter_layers(self.model)  # once per view: the walk is the cost
        yield view

    @contextlib.contextmanager
    def merged(self) -> Iterator[bool]:
        """Fold the active LoRA adapters into their base weights for a block of scoring; afterwards
        put every base weight back bit for bit (from a copy, not by subtracting: no rounding drift).

        Why: an unmerged adapter on every linear layer adds two small matmuls per layer per forward;
        on CPU the demo's final scoring of its LoRA model took 41 s unmerged and 31 s merged, as
        fast as the base model (guard checks gain alike). The copy costs the adapted base weights'
        memory while the block runs, which is why the default is CPU only. Yields whether anything
        was merged; nothing is while the adapters are disabled, already merged, or
        `merge_adapters` is off. Inside the block the adapters must stay on: `reference_view`
        (drift) needs them separate, so `run_suite` scores such probes outside it.
        """
        layers = _unmerged_lora_layers(self.model) if self.merge_adapters and not self._adapters_off else []
        if not layers:
            yield False
            return
        backups = [(m, {n: p.detach().clone() for n, p in m.get_base_layer().named_parameters(recurse=False)})
                   for m in layers]
        try:
            with torch.no_grad():
                for m in layers:
                    m.merge()
            yield True
        finally:
            with torch.no_grad():
                for m, saved in backups:
                    m.merged_adapters.clear()  # the weights below are the unmerged ones
                    params = dict(m.get_base_layer().named_parameters(recurse=False))
                    for n, value in saved.items():
                        params[n].copy_(value)

    @contextlib.contextmanager
    def _adapters(self) -> Iterator[None]:
        if not self._adapters_off:
            yield
            return
        with adapters_off(self.model, self._adapter_layers):
            yield

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """eval() + no_grad for one batch, then put back every module's own train flag."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), self._adapters():
                yield
        finally:
            for m, was_training in modes:
                m.training = was_training

    def _logits(self, input_ids, attention_mask, keep=None, **kw):
        """Forward pass returning logits only where ``keep`` says (2D int positions or bool mask)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         **({"logits_to_keep": keep} if keep is not None and self._keep_2d else {}), **kw)
        logits = out.logits
        if keep is not None and keep.dtype == torch.bool and logits.ndim == 3:
            logits = logits[keep]  # the model ignored logits_to_keep
        elif keep is not None and keep.dtype != torch.bool and logits.shape[1] != keep.shape[1]:
            logits = torch.take_along_dim(logits, keep[..., None], dim=1)
        return logits.float(), out

    def _shared(self, seqs: Sequence[Sequence[int]], side: str) -> int:
        """Tokens a batch's rows share at the start, to run once; 0 to run the batch plainly. The
        first shared batch of each padding side checks that this model's cache continues a prefix
        exactly (`_exact`); where it does not, every later batch of that side runs plainly."""
        if not self.share_prefix or self._prefix_exact.get(side) is False:
            return 0
        shared = prefixes.common_prefix(seqs)
        if shared and side not in self._prefix_exact:
            self._prefix_exact[side] = self._exact(side, seqs[:2], shared)
        return shared if self._prefix_exact.get(side, True) else 0

    def _exact(self, side: str, two: Sequence[Sequence[int]], shared: int) -> bool:
        """Whether two rows (cut 8 tokens past the prefix: the check costs little) give the plain
        forward's logits with their prefix run once: every real position for right padding, the
        next-token logits generation starts from for left padding. A model whose cache does not
        continue a prefix exactly (a custom forward; a sliding window shorter than the prompt, which
        counts the padding generation puts after the prefix) is scored plainly."""
        two = [list(s[:shared + 8]) for s in two]
        if side == "right":
            ids, mask = self._pad(two)
            plain = self._logits(ids, mask)[0][mask.bool()]
            ours = self._shared_logits(two, ids, mask, shared, None)[mask.bool()]
        else:
            plain = self._last_logits(*self._pad(two, side="left"))
            ids, mask, cache = self._shared_left(two, shared)
            ours = self._last_logits(ids[:, shared:], mask, use_cache=True, **{self._cache_kw: cache})
        err = prefixes.relative_error(plain, ours)
        if err > prefixes.RTOL:
            log.info("scorer: this model's cached forward differs from its plain one (%s padding, max error %.3g "
                     "of the logits' spread); each row runs its own prompt prefix", side, err)
        return err <= prefixes.RTOL

    def _prefix_cache(self, first: Sequence[int], shared: int, rows: int, logits: bool = False):
        """``first[:shared]`` run once: its KV cache expanded (a view) to ``rows`` rows, and its
        ``[1, shared, V]`` logits when ``logits`` (else None)."""
        cache = prefixes.new_cache(self.model)
        ids = torch.tensor([list(first[:shared])], device=self.device)
        keep = {} if logits or not self._keep else {"logits_to_keep": 1}
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                         **{self._cache_kw: cache}, **keep)
        prefixes.expand_cache(cache, rows)
        return cache, (out.logits.float() if logits else None)

    def _shared_logits(self, seqs, ids, mask, shared: int, keep: torch.Tensor | None) -> torch.Tensor:
        """`_logits` of the right-padded batch ``ids`` (of ``seqs``) with its first ``shared`` tokens
        run once; ``keep`` must leave the prefix out (None: every position, the prefix's included)."""
        cache, head = self._prefix_cache(seqs[0], shared, len(seqs), logits=keep is None)
        tail, _ = self._logits(ids[:, shared:], mask, keep=None if keep is None else keep[:, shared:],
                               use_cache=True, **{self._cache_kw: cache})
        return tail if head is None else torch.cat([head.expand(len(seqs), -1, -1), tail], dim=1)

    def _batch_logits(self, seqs: Sequence[Sequence[int]], keep: torch.Tensor | None = None) -> torch.Tensor:
        """`_logits` of ``seqs`` right-padded (``keep``: a bool ``[B, W]`` mask of the positions to
        project, or every position when ``None``), the batch's shared prefix run once."""
        ids, mask = self._pad(seqs)
        shared = self._shared(seqs, "right")
        if shared and (keep is None or not keep[:, :shared].any()):  # else labels on the shared prompt
            return self._shared_logits(seqs, ids, mask, shared, keep)
        return self._logits(ids, mask, keep=keep)[0]

    def _pad(self, seqs: Sequence[Sequence[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if not s:
                continue
            sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, sl] = torch.tensor(list(s), dtype=torch.long)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def _token_batches(self, lengths: Sequence[int], order: Sequence[int]) -> Iterator[list[int]]:
        """Split ``order`` (longest first) into batches of <= batch_size rows and max_batch_tokens."""
        batch: list[int] = []
        for i in order:
            width = lengths[batch[0]] if batch else lengths[i]
            if batch and (len(batch) >= self.batch_size or (len(batch) + 1) * width > self.max_batch_tokens):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    # ----------------------------------------------------------------- request types
    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
                      ) -> list[tuple[float, bool]]:
        """Summed log-prob of each continuation given its context, and whether it is the greedy one.

        Contexts longer than ``max_length + 1 - len(continuation)`` are cut from the left, as in
        lm-eval. Requests with identical (cut) contexts share one context forward pass.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        conts: list[list[int]] = []
        for i, (ctx, cont) in enumerate(requests):
            cont = list(cont)
            if not ctx or not cont:
                raise ValueError(f"request {i}: context and continuation must both be non-empty")
            if len(cont) > self.max_length:
                raise ValueError(f"request {i}: continuation longer than max_length={self.max_length}")
            ctx = tuple(ctx)[-(self.max_length + 1 - len(cont)):]
            groups.setdefault(ctx, []).append(i)
            conts.append(cont)
        keys = sorted(groups, key=lambda c: (-len(c), c))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        # batch_size requests per batch (as lm-eval counts them: fewer contexts means less padding)
        # and a bounded KV cache once it is expanded over the choices
        cache_budget = _CACHE_TOKENS_PER_BATCH_TOKEN * self.max_batch_tokens
        batch: list[tuple[int, ...]] = []
        n_rows = 0
        for key in keys + [None]:
            rows = n_rows + len(groups[key]) if key is not None else 0
            fits = rows <= self.batch_size and rows * len(batch[0]) <= cache_budget if batch else True
            if key is not None and fits:
                batch.append(key)
                n_rows = rows
                continue
            if batch:
                with self._inference():
                    self._score_groups(batch, groups, conts, results)
            batch, n_rows = ([key], len(groups[key])) if key is not None else ([], 0)
        return results

    def _score_groups(self, ctxs, groups, conts, results) -> None:
        ctx_ids, ctx_mask = self._pad(ctxs)
        last = torch.tensor([[len(c) - 1] for c in ctxs], device=self.device)
        logits, out = self._logits(ctx_ids, ctx_mask, keep=last, use_cache=True)
        first_lp = F.log_softmax(logits[:, 0], dim=-1)  # predicts each continuation's first token
        greedy_first = first_lp.argmax(-1).tolist()
        rows = [(g, r) for g, c in enumerate(ctxs) for r in groups[c]]
        for g, r in rows:
            results[r] = (float(first_lp[g, conts[r][0]]), greedy_first[g] == conts[r][0])
        # the other continuation tokens run on the context's KV cache, in chunks of similar width
        tails = sorted((gr for gr in rows if len(conts[gr[1]]) > 1), key=lambda gr: -len(conts[gr[1]]))
        chunks = [tails[s] for s in _width_chunks([len(conts[r]) - 1 for _, r in tails])]
        cache = getattr(out, "cache", None)
        cache = out.past_key_values if cache is None else cache
        for n, chunk in enumerate(chunks):  # each chunk extends its own copy of the cache
            self._score_tails(cache if n == len(chunks) - 1 else copy.deepcopy(cache), chunk, ctxs,
                              ctx_mask, conts, results)

    def _score_tails(self, cache, chunk, ctxs, ctx_mask, conts, results) -> None:
        sel = torch.tensor([g for g, _ in chunk], device=self.device)
        cache.reorder_cache(sel)  # one cache row per continuation
        tail_ids, tail_mask = self._pad([conts[r][:-1] for _, r in chunk])
        ctx_len = torch.tensor([len(ctxs[g]) for g, _ in chunk], device=self.device)
        pos = ctx_len[:, None] + torch.arange(tail_ids.shape[1], device=self.device)[None]
        mask = torch.cat([ctx_mask[sel], tail_mask], dim=1)
        logits, _ = self._logits(tail_ids, mask, keep=tail_mask.bool(), position_ids=pos, use_cache=True,
                                 **{self._cache_kw: cache})
        lp = F.log_softmax(logits, dim=-1)
        target = torch.tensor([t for _, r in chunk for t in conts[r][1:]], device=self.device)
        tok_lp = lp.gather(1, target[:, None])[:, 0]
        hit = lp.argmax(-1) == target
        counts = [len(conts[r]) - 1 for _, r in chunk]
        for (_, r), s, h in zip(chunk, tok_lp.split(counts), hit.split(counts)):
            ll, greedy = results[r]
            results[r] = (ll + float(s.sum()), greedy and bool(h.all()))

    def completion_nll(self, examples: Sequence[tuple[Sequence[int], Sequence[int]]]
                       ) -> list[tuple[float, int]]:
        """Summed NLL over label tokens (labels != -100) and their count, per (input_ids, labels)."""
        seqs = [list(ids)[: self.max_length] for ids, _ in examples]
        labs = [list(lab)[: self.max_length] for _, lab in examples]
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        out: list[tuple[float, int]] = [(0.0, 0)] * len(seqs)
        for batch in self._token_batches([len(s) for s in seqs], order):
            rows = [seqs[i] for i in batch]
            target = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long, device=self.device)
            for row, i in enumerate(batch):
                target[row, : len(labs[i]) - 1] = torch.tensor(labs[i][1:], dtype=torch.long)
            keep = target != -100  # position t predicts label t+1; project logits only there
            if not keep.any():
                continue
            with self._inference():
                logits = self._batch_logits(rows, keep)
            nll = F.cross_entropy(logits, target[keep], reduction="none")
            counts = keep.sum(1).tolist()
            for row, chunk in enumerate(torch.split(nll, counts)):
                out[batch[row]] = (float(chunk.sum()), counts[row])
        return out

    def iter_logprobs(self, ids_list: Sequence[Sequence[int]], batch_size: int | None = None
                      ) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(index, log_probs[T, V])`` of the next token at every position, batch by batch.

        The order (longest first, then index) depends only on the lengths, so two scorers iterated
        over the same ids can be zipped item by item without holding all distributions in memory.
        """
        seqs = [list(ids)[: self.max_length] for ids in ids_list]
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        saved = self.batch_size
        self.batch_size = batch_size or saved
        try:
            batches = list(self._token_batches([len(s) for s in seqs], order))
        finally:
            self.batch_size = saved
        for batch in batches:
            with self._inference():
                logits = self._batch_logits([seqs[i] for i in batch])
            lp = logits.sub_(logits.logsumexp(-1, keepdim=True))  # in place: B x T x V is the peak
            for row, i in enumerate(batch):
                yield i, lp[row, : len(seqs[i])]

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                 stop: Sequence[str] | None = None) -> list[str]:
        """Greedy continuations, batched with left padding, cut at the first stop string or EOS."""
        return self.answer_texts(self.generate_ids(prompts, max_new_tokens=max_new_tokens, stop=stop), stop=stop)

    def answer_texts(self, answers: Sequence[Sequence[int]], *, stop: Sequence[str] | None = None) -> list[str]:
        """The text of each ``generate_ids`` answer: its EOS dropped, cut at the first stop string."""
        eos = self._eos_ids()
        out = []
        for new in answers:
            text = self.tokenizer.decode(new[:-1] if new and new[-1] in eos else new, skip_special_tokens=True)
            for s in stop or ():
                text = text.split(s, 1)[0]
            out.append(text)
        return out

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 32,
                     stop: Sequence[str] | None = None) -> list[list[int]]:
        """Greedy continuations as token ids, batched widest first with left padding; each ends with
        its EOS token when one was generated (nothing after it)."""
        cfg, eos = self._generation_config(max_new_tokens, stop)
        room = max(1, self.max_length - max_new_tokens)  # keep the prompt's end if it is too long
        seqs = [list(p)[-room:] for p in prompts]
        order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i]), i))
        out: list[list[int]] = [[] for _ in seqs]
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            rows = [seqs[i] for i in batch]
            with self._inference():
                ids, mask, cache = self._generation_inputs(rows)
                gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg,
                                          tokenizer=self.tokenizer, **({self._cache_kw: cache} if cache else {}))
            for row, i in enumerate(batch):
                new = gen[row, ids.shape[1]:].tolist()
                out[i] = new[:next((k + 1 for k, t in enumerate(new) if t in eos), len(new))]
        return out

    def _generation_inputs(self, rows: Sequence[Sequence[int]]):
        """Left-padded ``(ids, mask, cache)`` for ``generate``: the rows' shared prefix in ``cache``,
        run once, or ``cache`` None where nothing is shared."""
        shared = self._shared(rows, "left")
        if shared:
            return self._shared_left(rows, shared)
        return (*self._pad(rows, side="left"), None)

    def _shared_left(self, rows: Sequence[Sequence[int]], shared: int):
        """``prefix + padding + own tokens`` per row, its mask, and the prefix's cache: ``generate``
        runs only what the cache lacks and takes each token's position from the mask."""
        tails, tail_mask = self._pad([r[shared:] for r in rows], side="left")
        head = tails.new_tensor([list(rows[0][:shared])]).expand(len(rows), -1)
        ids = torch.cat([head, tails], 1)
        mask = torch.cat([torch.ones_like(head), tail_mask], 1)
        return ids, mask, self._prefix_cache(rows[0], shared, len(rows))[0]

    def _last_logits(self, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
        """Next-token logits after left-padded ``ids`` (the rows' last ``ids.shape[1]`` tokens of
        ``mask``), positions counted as ``generate`` counts them: real tokens only."""
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kw).logits[:, -1].float()

    def _generation_config(self, max_new_tokens: int, stop: Sequence[str] | None):
        """Greedy decoding settings (the model's own config otherwise) and the set of EOS ids."""
        cfg = copy.deepcopy(self.model.generation_config)
        cfg.update(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                   max_new_tokens=max_new_tokens, pad_token_id=self.pad_id)
        eos = self._eos_ids()
        if cfg.eos_token_id is None and eos:  # the tokenizer's EOS, the fallback `_eos_ids` took
            cfg.eos_token_id = sorted(eos)
        if stop:
            cfg.stop_strings = list(stop)
        return cfg, eos

    def _eos_ids(self) -> set[int]:
        """The ids that end a greedy answer: the model's generation config's, else the tokenizer's EOS."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        return {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
