"""Turning what users pass (token ids, text, batches of text, chat messages) into model inputs.

Batches of text are padded on the left, so position -1 is every row's last real token; positions
then count from each row's first real token, so a padded row gives the logits of the row alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .errors import InputError

Messages = Sequence[dict]  # [{"role": "user", "content": "..."}]


@dataclass
class Prepared:
    tokens: torch.Tensor | None  # [B, P] int64 (None when the input is a residual stream)
    padding: torch.Tensor | None  # [B, past + P] bool, True = real token; None when nothing is padded
    positions: torch.Tensor  # [B, P] absolute positions
    resid: torch.Tensor | None = None  # [B, P, M] when starting mid-model


def is_messages(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(m, dict) for m in obj)


def is_message_batch(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(is_messages(m) for m in obj)


class TokenizerMixin:
    """Tokenisation helpers of ``HookedLlama`` (they need ``self.tokenizer``)."""

    tokenizer: Any

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise InputError(
                "this model has no tokenizer; pass token ids, or load it with a tokenizer "
                "(HookedLlama.from_pretrained(dir) or from_hf(model, tokenizer))"
            )
        return self.tokenizer

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """Chat messages as the prompt text the tokenizer's chat template makes of them."""
        tok = self._require_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise InputError("this tokenizer has no chat template; pass plain text instead of chat messages")
        for m in messages:
            if not {"role", "content"} <= set(m):
                raise InputError(f"a chat message needs 'role' and 'content' keys, got {sorted(m)}")
        return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, input, prepend_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, P], attention_mask [B, P]) for text, a list of texts, or chat messages; left-padded."""
        tok = self._require_tokenizer()
        if is_messages(input):
            texts = [self.apply_chat_template(input)]
        elif is_message_batch(input):
            texts = [self.apply_chat_template(m) for m in input]
        elif isinstance(input, str):
            texts = [input]
        elif isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            texts = list(input)
        else:
            raise InputError(
                f"cannot tokenize {type(input).__name__}; pass a string, a list of strings, "
                "chat messages, or a tensor of token ids"
            )
        chat = is_messages(input) or is_message_batch(input)
        rows = [tok(t, add_special_tokens=not chat)["input_ids"] for t in texts]
        bos = tok.bos_token_id
        if prepend_bos is None:
            cfg = getattr(self, "cfg", None)
            prepend_bos = getattr(cfg, "default_prepend_bos", None) or None  # False: as the tokenizer does
        if prepend_bos and bos is not None:
            rows = [r if r[:1] == [bos] else [bos] + r for r in rows]
        elif prepend_bos is False and bos is not None and not chat:
            rows = [r[1:] if r[:1] == [bos] and len(r) > 1 else r for r in rows]
        if any(len(r) == 0 for r in rows):
            raise InputError("empty prompt: the text tokenizes to no tokens; pass at least one character")
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
        return tokens, mask

    def to_tokens(
        self,
        input,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Token ids [B, P] on the model's device (left-padded for several texts).

        ``prepend_bos``: True adds the BOS token, False removes one the tokenizer added, None follows
        ``cfg.default_prepend_bos`` (False here: the tokenizer's own behaviour).
        """
        if padding_side not in (None, "left"):
            raise InputError(f"padding_side={padding_side!r}: batches are always left-padded here; pass 'left' or None")
        tokens = self.tokenize(input, prepend_bos)[0]
        return tokens.to(self.device) if move_to_device else tokens

    def to_string(self, tokens) -> str | list[str]:
        tok = self._require_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(row) for row in tokens.tolist()]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tok.decode(tokens if isinstance(tokens, list) else [tokens])

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None) -> list:
        """One string per token of a single prompt (for plot labels); a list of prompts gives one list each."""
        tok = self._require_tokenizer()
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos) for t in input]
        if isinstance(input, (list, tuple)) and all(isinstance(t, int) for t in input):
            input = torch.tensor(input, dtype=torch.long)
        ids = input if isinstance(input, torch.Tensor) else self.tokenize(input, prepend_bos)[0]
        if ids.dim() == 0:
            ids = ids[None]
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InputError("to_str_tokens takes one prompt; index the batch first")
            ids = ids[0]
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_token(self, text: str) -> int:
        """The id of a text that is exactly one token (e.g. " Mary"); an error otherwise."""
        ids = self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputError(f"{text!r} is {len(ids)} tokens, not one: {ids}; pick a single-token string")
        return ids[0]


def prepare_input(
    model,
    input,
    attention_mask=None,
    position_ids=None,
    *,
    past_len: int = 0,
    resid: bool = False,
    prepend_bos: bool | None = None,
) -> Prepared:
    """Validate and normalise a forward call's input."""
    device = model.device
    if resid:
        if not (
            isinstance(input, torch.Tensor)
            and input.is_floating_point()
            and input.dim() == 3
            and input.shape[-1] == model.d_model
        ):
            raise InputError(f"start_at_layer needs a residual stream [batch, pos, {model.d_model}] float tensor")
        tokens, x = None, input
        B, P = x.shape[:2]
    else:
        x = None
        if isinstance(input, torch.Tensor):
            tokens = input
            if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise InputError(
                    f"token ids must be an integer tensor, got {tokens.dtype}; "
                    "pass start_at_layer= to feed a residual stream"
                )
            if tokens.dim() == 1:
                tokens = tokens[None]
            if tokens.dim() != 2:
                raise InputError(f"token ids must be [batch, pos], got shape {tuple(tokens.shape)}")
        else:
            tokens, mask = model.tokenize(input, prepend_bos)
            if attention_mask is None:
                attention_mask = mask
        tokens = tokens.to(device=device, dtype=torch.long)
        B, P = tokens.shape
        if P == 0 or B == 0:
            raise InputError(f"empty input of shape {tuple(tokens.shape)}; pass at least one token")
        lo, hi = (0, 0) if torch.compiler.is_compiling() else (int(tokens.min()), int(tokens.max()))
        if lo < 0 or hi >= model.d_vocab:
            bad = hi if hi >= model.d_vocab else lo
            raise InputError(
                f"token id {bad} is out of range for vocab size {model.d_vocab} (ids 0..{model.d_vocab - 1})"
            )
    padding = None
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != (B, past_len + P):
            raise InputError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the input needs "
                f"{(B, past_len + P)} (batch, past + new positions)"
            )
        padding = attention_mask.bool()
        if bool(padding.all()):
            padding = None
    if position_ids is None:
        if padding is None:
            positions = torch.arange(past_len, past_len + P, device=device)[None].expand(B, P)
        else:
            positions = (padding.long().cumsum(-1) - 1).clamp(min=0)[:, past_len:]
    else:
        positions = torch.as_tensor(position_ids, device=device)
        if positions.dim() == 1:
            positions = positions[None].expand(B, -1)
        if positions.shape != (B, P):
            raise InputError(f"position_ids has shape {tuple(positions.shape)}, expected {(B, P)}")
    limit = model.config.max_position_embeddings
    from .config import rope_type

    if not torch.compiler.is_compiling() and rope_type(model.config) != "dynamic" and int(positions.max()) >= limit:
        raise InputError(
            f"input reaches position {int(positions.max())} but the model supports "
            f"{limit} positions (max_position_embeddings); shorten the prompt"
        )
    return Prepared(tokens=tokens, padding=padding, positions=positions, resid=x)
