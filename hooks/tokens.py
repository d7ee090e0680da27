"""Turning what users pass (token ids, text, batches of text, chat messages) into model inputs.

Batches of text are padded on the left, so position -1 is every row's last real token; positions
then count from each row's first real token, so a padded row gives the logits of the row alone. TransformerLens
code that asks for right padding (``padding_side="right"``, ``cfg.default_padding_side = "right"``, or
``tokenizer.padding_side = "right"`` set after the model took the tokenizer) gets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .errors import InputAssertionError, InputError

if TYPE_CHECKING:
    from .model import HookedLlama

Messages = Sequence[dict]  # [{"role": "user", "content": "..."}]


@dataclass
class Prepared:
    tokens: torch.Tensor | None  # [B, P] int64 (None when the input is a residual stream)
    padding: torch.Tensor | None  # [B, past + P] bool, True = real token; None when nothing is padded
    positions: torch.Tensor  # [B, P] absolute positions
    resid: torch.Tensor | None = None  # [B, P, M] when starting mid-model


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character -> byte: printable Latin-1 bytes stand for themselves, the
    rest for 256 + n in order (how byte-level tokenizers spell the pieces of a multi-byte character)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """One display label per token id: its text (``decode([id])``), or, for a token that is only part of a
    multi-byte character (which decodes to "\ufffd"), its bytes as escapes (``"\\xe6\\x97"``; a
    SentencePiece byte token as its own name, ``"<0xE6>"``). For tables and plots; ``to_str_tokens`` keeps
    TransformerLens's plain ``decode``."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        if "\ufffd" in text:
            raw = tokenizer.convert_ids_to_tokens(int(i))
            if isinstance(raw, str) and raw and all(c in _BYTE_LEVEL for c in raw):
                text = bytes(_BYTE_LEVEL[c] for c in raw).decode("utf-8", errors="backslashreplace")
            elif isinstance(raw, str) and raw:
                text = raw
        out.append(text)
    return out


def is_messages(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(isinstance(m, dict) for m in obj)


def is_message_batch(obj: Any) -> bool:
    return isinstance(obj, (list, tuple)) and len(obj) > 0 and all(is_messages(m) for m in obj)


def _strip_trailing(row: list[int], eos: int) -> list[int]:
    while len(row) > 1 and row[-1] == eos:
        row = row[:-1]
    return row


def concrete(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read (not while compiling, not a fake or meta tensor of a tracer such
    as nnsight's ``scan``): value checks are skipped on tensors that have none."""
    if torch.compiler.is_compiling() or t.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


class TokenizerMixin:
    """Tokenisation helpers of ``HookedLlama`` (they need ``self.tokenizer``)."""

    @property
    def tokenizer(self) -> Any:
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tok: Any) -> None:
        # the model pads on the left by default, so it sets the tokenizer it takes to the left (as nnsight
        # does); from then on the tokenizer's padding_side is the default, whoever changes it
        if tok is not None and getattr(tok, "padding_side", None) is not None:
            tok.padding_side = "left"
        self.__dict__["_tokenizer"] = tok

    def padding_side(self) -> str:
        """Where batches of text are padded when no ``padding_side`` is passed: the tokenizer's
        ``padding_side`` ("left" when the model took it; TransformerLens code that sets
        ``tokenizer.padding_side = "right"`` or ``cfg.default_padding_side = "right"`` gets right padding)."""
        side = getattr(self.tokenizer, "padding_side", None)
        return side if side in ("left", "right") else self.__dict__.get("_padding_side", "left")

    def set_padding_side(self, side: str) -> None:
        """``cfg.default_padding_side = side`` ("left" or "right"): the tokenizer's padding side."""
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}", param="padding_side")
        if self.tokenizer is not None:
            self.tokenizer.padding_side = side
        self.__dict__["_padding_side"] = side

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

    def tokenize(
        self, input, prepend_bos: bool | None = None, padding_side: str | None = None, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, P], attention_mask [B, P]) for text, a list of texts, or chat messages; padded on
        ``padding_side`` (default: ``self.padding_side()``, "left"); ``truncate`` keeps the first
        ``max_position_embeddings`` tokens of each text."""
        tok = self._require_tokenizer()
        side = self.padding_side() if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {side!r}", param="padding_side")
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
        if truncate:
            rows = [r[: self.config.max_position_embeddings] for r in rows]
        eos = tok.eos_token_id
        if getattr(getattr(self, "cfg", None), "tokenizer_appends_eos", False) and eos is not None:
            rows = [_strip_trailing(r, eos) for r in rows]  # a tokenizer that ends every text with EOS
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            where = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            tokens[i, where] = torch.tensor(r, dtype=torch.long)
            mask[i, where] = 1
        return tokens, mask

    def to_tokens(
        self,
        input,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Token ids [B, P] on the model's device (several texts padded on ``padding_side``, by default
        the left: see ``padding_side()``).

        ``prepend_bos``: True adds the BOS token, False removes one the tokenizer added, None follows
        ``cfg.default_prepend_bos`` (False here: the tokenizer's own behaviour). ``truncate`` keeps the first
        ``cfg.n_ctx`` tokens of each text, as TransformerLens does.
        """
        tokens = self.tokenize(input, prepend_bos, padding_side=padding_side, truncate=truncate)[0]
        return tokens.to(self.device) if move_to_device else tokens

    def to_string(self, tokens) -> str | list[str]:
        tok = self._require_tokenizer()
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [tok.decode(row) for row in tokens.tolist()]
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()
        return tok.decode(tokens if isinstance(tokens, list) else [tokens])

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None) -> list:
        """One string per token of a single prompt (for plot labels): text, or ids (a tensor, a numpy array
        or a list of ints, [pos] or [1, pos]); a list of prompts gives one list each."""
        tok = self._require_tokenizer()
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, (str, list, torch.Tensor)) for t in input):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        if isinstance(input, (list, tuple)) and all(isinstance(t, int) for t in input):
            input = torch.tensor(input, dtype=torch.long)
        if type(input).__module__ == "numpy":  # an ndarray of ids
            input = torch.as_tensor(input)
        ids = input if isinstance(input, torch.Tensor) else self.tokenize(input, prepend_bos, padding_side)[0]
        if ids.dim() == 0:
            ids = ids[None]
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise InputError("to_str_tokens takes one prompt; index the batch first")
            ids = ids[0]
        return [tok.decode([i]) for i in ids.tolist()]

    def to_single_str_token(self, token: int) -> str:
        """The text of one token id."""
        if isinstance(token, bool) or not isinstance(token, int):
            raise InputError(f"to_single_str_token takes one token id (an int), got {type(token).__name__}")
        return self.to_str_tokens(torch.tensor([token]))[0]

    def to_single_token(self, text: str) -> int:
        """The id of a text that is exactly one token (e.g. " Mary"); an error otherwise."""
        ids = self._require_tokenizer()(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise InputAssertionError(f"{text!r} is {len(ids)} tokens, not one: {ids}; pick a single-token string")
        return ids[0]


def prepare_input(
    model: HookedLlama,
    input,
    attention_mask=None,
    position_ids=None,
    *,
    past_len: int = 0,
    resid: bool = False,
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
) -> Prepared:
    """Validate and normalise a forward call's input."""
    if padding_side not in (None, "left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}", param="padding_side")
    device = model.device
    if resid:
        if not (
            isinstance(input, torch.Tensor)
            and input.is_floating_point()
            and input.dim() == 3
            and input.shape[-1] == model.d_model
        ):
            raise InputError(
                f"start_at_layer needs a residual-stream tensor [batch, pos, {model.d_model}] (float), not token ids "
                "or text; get one with stop_at_layer or input_to_embed"
            )
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
            tokens, mask = model.tokenize(input, prepend_bos, padding_side=padding_side)
            if attention_mask is None:
                attention_mask = mask
        tokens = tokens.to(device=device, dtype=torch.long)
        B, P = tokens.shape
        if P == 0 or B == 0:
            raise InputError(f"empty input of shape {tuple(tokens.shape)}; pass at least one token")
        lo, hi = (int(tokens.min()), int(tokens.max())) if concrete(tokens) else (0, 0)
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
        if concrete(padding) and bool(padding.all()):
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

    if concrete(positions) and rope_type(model.config) != "dynamic" and int(positions.max()) >= limit:
        raise InputError(
            f"input reaches position {int(positions.max())} but the model supports "
            f"{limit} positions (max_position_embeddings); shorten the prompt"
        )
    return Prepared(tokens=tokens, padding=padding, positions=positions, resid=x)
