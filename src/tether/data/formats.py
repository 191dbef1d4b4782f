"""Turn records into token ids with a loss mask, in the three shapes users bring.

- chat: ``{"messages": [{"role", "content"}, ...]}``; rendered with the tokenizer's chat template,
  loss on assistant turns only;
- prompt/completion: ``{"prompt": str, "completion": str}`` (or each a list of messages, as in TRL);
  loss on the completion only;
- text: ``{"text": str}``; loss on every token.

Masks are built by rendering growing prefixes of the conversation and diffing token ids, so they
follow whatever template the tokenizer carries instead of a hard-coded role marker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .readers import DataError, Record

IGNORE_INDEX = -100
Shape = Literal["chat", "prompt_completion", "text"]
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt: str  # text the model sees before the (last) completion; "" for plain text
    completion: str  # the (last) target text; the whole text for plain text
    source: str = ""
    line: int | None = None

    @property
    def n_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def detect_shape(rec: Record) -> Shape:
    d = rec.data
    if "messages" in d:
        return "chat"
    if "prompt" in d or "completion" in d:
        return "prompt_completion"
    if "text" in d:
        return "text"
    keys = ", ".join(sorted(d)) or "none"
    raise DataError(rec.source, rec.line, None,
                    "cannot tell the record's shape: expected 'messages', 'prompt'+'completion' or 'text' "
                    f"(keys: {keys})")


def validate(rec: Record, shape: Shape | None = None) -> Shape:
    shape = shape or detect_shape(rec)
    d = rec.data
    if shape == "chat":
        _check_messages(rec, d.get("messages"), "messages", need_assistant=True)
    elif shape == "prompt_completion":
        for key in ("prompt", "completion"):
            if key not in d:
                raise DataError(rec.source, rec.line, key, "missing")
            v = d[key]
            if isinstance(v, list):
                _check_messages(rec, v, key, need_assistant=(key == "completion"))
            elif not isinstance(v, str):
                raise DataError(rec.source, rec.line, key, f"expected a string, got {type(v).__name__}")
        if isinstance(d["completion"], str) and not d["completion"].strip():
            raise DataError(rec.source, rec.line, "completion", "empty")
    else:
        t = d.get("text")
        if not isinstance(t, str):
            raise DataError(rec.source, rec.line, "text", f"expected a string, got {type(t).__name__}")
        if not t.strip():
            raise DataError(rec.source, rec.line, "text", "empty")
    return shape


def _check_messages(rec: Record, msgs: Any, key: str, need_assistant: bool) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(rec.source, rec.line, key, "expected a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(rec.source, rec.line, f"{key}[{i}]", "expected an object with 'role' and 'content'")
        if m.get("role") not in ROLES:
            raise DataError(rec.source, rec.line, f"{key}[{i}].role",
                            f"expected one of {', '.join(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(rec.source, rec.line, f"{key}[{i}].content", "expected a string")
    if need_assistant and not any(m["role"] == "assistant" for m in msgs):
        raise DataError(rec.source, rec.line, key, "no assistant message to learn from")


def _render(tok, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_record(rec: Record, tok, *, max_length: int | None = None, chat: bool | None = None,
                  shape: Shape | None = None) -> Example:
    """Tokenise one record with its loss mask.

    Args:
        chat: for string prompt/completion records, wrap them as a user/assistant exchange in the
            chat template. ``None`` means: wrap when the tokenizer has a chat template.
    """
    shape = validate(rec, shape)
    d = rec.data
    if shape == "text":
        ids = _ids(tok, d["text"])
        if tok.eos_token_id is not None:
            ids = ids + [tok.eos_token_id]
        ex = Example(ids, list(ids), "", d["text"], rec.source, rec.line)
    elif shape == "chat" or isinstance(d.get("prompt"), list) or isinstance(d.get("completion"), list):
        if shape == "chat":
            msgs = d["messages"]
        else:
            p, c = d["prompt"], d["completion"]
            msgs = (p if isinstance(p, list) else [{"role": "user", "content": p}]) + (
                c if isinstance(c, list) else [{"role": "assistant", "content": c}])
        ex = _encode_chat(rec, tok, msgs)
    else:
        use_chat = chat if chat is not None else bool(getattr(tok, "chat_template", None))
        if use_chat:
            ex = _encode_chat(rec, tok, [{"role": "user", "content": d["prompt"]},
                                         {"role": "assistant", "content": d["completion"]}])
        else:
            p_ids = _ids(tok, d["prompt"])
            c_ids = _ids(tok, d["completion"])
            if tok.eos_token_id is not None:
                c_ids = c_ids + [tok.eos_token_id]
            ex = Example(p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids, d["prompt"], d["completion"],
                         rec.source, rec.line)
    if max_length is not None and len(ex.input_ids) > max_length:
        ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        if ex.n_target_tokens == 0:
            raise DataError(rec.source, rec.line, "completion" if shape != "text" else "text",
                            f"nothing left to learn after truncating to max_length={max_length}")
    return ex


def _encode_chat(rec: Record, tok, msgs: list[dict]) -> Example:
    if not getattr(tok, "chat_template", None):
        raise DataError(rec.source, rec.line, "messages", "the tokenizer has no chat template for chat records")
    ids: list[int] = []
    labels: list[int] = []
    prompt_text, completion_text = "", ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            before = _render(tok, msgs[:i], add_generation_prompt=True)
            upto = _render(tok, msgs[: i + 1], add_generation_prompt=False)
            if not upto.startswith(before):
                raise DataError(rec.source, rec.line, f"messages[{i}]",
                                "the chat template does not render conversations as growing prefixes")
            # tokens before the assistant turn are context; the turn itself (with its end marker) is target
            ctx_ids = _ids(tok, before)
            full_ids = _ids(tok, upto)
            if full_ids[: len(ctx_ids)] != ctx_ids:  # tokenisation merged across the boundary
                full_ids = ctx_ids + _ids(tok, upto[len(before):])
            new_ctx = ctx_ids[len(ids):]
            new_tgt = full_ids[len(ctx_ids):]
            ids += new_ctx + new_tgt
            labels += [IGNORE_INDEX] * len(new_ctx) + new_tgt
            prompt_text, completion_text = before, m["content"]
    tail = _ids(tok, _render(tok, msgs, add_generation_prompt=False))[len(ids):]
    ids += tail
    labels += [IGNORE_INDEX] * len(tail)
    return Example(ids, labels, prompt_text, completion_text, rec.source, rec.line)


def encode_records(records: Sequence[Record], tok, *, max_length: int | None = None,
                   chat: bool | None = None, skip_invalid: bool = False) -> tuple[list[Example], list[DataError]]:
    """Encode all records; on error raise the first, or with ``skip_invalid`` return the skips."""
    out, skipped = [], []
    for r in records:
        try:
            out.append(encode_record(r, tok, max_length=max_length, chat=chat))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(e)
    return out, skipped


def validate_records(records: Sequence[Record]) -> Shape:
    """Check every record before any model is loaded; all records must share one shape."""
    shapes = set()
    for r in records:
        shapes.add(validate(r))
    if len(shapes) > 1:
        raise DataError(records[0].source, None, None, f"records mix shapes: {', '.join(sorted(shapes))}")
    return shapes.pop()
