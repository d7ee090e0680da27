"""Generation with a KV cache while hooks stay active: each step runs the new positions only."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from _core.errors import arg

from .errors import InputError

if TYPE_CHECKING:
    from .model import HookedLlama


class KVCache:
    """Keys (after RoPE) and values per layer, [B, G, K, D]; grows by concatenation."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0  # positions already stored (committed after each forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer].to(k.device), k], dim=2)
            v = torch.cat([self.values[layer].to(v.device), v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def commit(self, n_new: int) -> None:
        self.length += n_new


def wants_sampling(do_sample: bool | None, temperature: float | None, top_k, top_p) -> bool:
    """Greedy unless ``do_sample`` or a sampling parameter says otherwise; temperature 0 is greedy."""
    if temperature == 0:
        return False
    if do_sample is not None:
        return bool(do_sample)
    return temperature is not None or top_k is not None or top_p is not None


def sample_next(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V] (temperature → top-k → top-p, as HF)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(1.0 if temperature is None else temperature, 1e-8)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _check_sampling(max_new_tokens, temperature, top_k, top_p, do_sample=None) -> None:
    """The domains of generate's numeric arguments (one-line ``InputError`` naming the fix).
    ``temperature=0`` means greedy (as TransformerLens) unless sampling is asked for explicitly."""
    import math

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputError(
            f"{arg('max_new_tokens')} must be an integer >= 0, got {max_new_tokens!r}", param="max_new_tokens"
        )
    if temperature is not None and not (number(temperature) and temperature == 0 and do_sample is not True):
        if not number(temperature) or not math.isfinite(temperature) or temperature <= 0:
            raise InputError(
                f"temperature must be a finite number > 0, got {temperature!r}; leave out {arg('do_sample')} "
                "for greedy decoding",
                param="temperature",
            )
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise InputError(f"top_k must be an integer >= 1 (or 0/None for no top-k filtering), got {top_k!r}")
    if top_p is not None and (not number(top_p) or not 0 < top_p <= 1):
        raise InputError(f"{arg('top_p')} must be a number in (0, 1], got {top_p!r}", param="top_p")


def _check_positions(position_ids, mask: torch.Tensor) -> None:
    """Generation counts each row's positions from its first real token (what the mask implies); given
    ``position_ids`` must say the same (nnsight passes them for batched invokes)."""
    implied = (mask.long().cumsum(-1) - 1).clamp(min=0)
    given = torch.as_tensor(position_ids, device=mask.device)
    if given.dim() == 1:
        given = given[None].expand_as(implied)
    if given.shape != implied.shape or not torch.equal(given.long(), implied):
        raise InputError(
            "generate counts each row's positions from its first real token; position_ids that differ from "
            "that are not supported: leave them out",
            param="position_ids",
        )


def generate(
    model: HookedLlama,
    input,
    max_new_tokens: int,
    *,
    attention_mask=None,
    do_sample: bool | None,
    temperature,
    top_k,
    top_p,
    stop_at_eos: bool,
    return_type: str,
    seed: int | None,
    verbose: bool,
    use_past_kv_cache: bool = True,
    eos_token_id=None,
    freq_penalty: float = 0.0,
    prepend_bos: bool | None = None,
    streamer=None,
    min_new_tokens: int = 0,
    position_ids=None,
):
    if return_type not in ("input", "str", "tokens", "completion"):
        raise InputError(f"return_type must be 'input', 'str', 'tokens' or 'completion', got {return_type!r}")
    _check_sampling(max_new_tokens, temperature, top_k, top_p, do_sample)
    if not isinstance(input, (str, list, tuple, torch.Tensor)):
        raise InputError(
            f"generate takes a prompt string, a list of prompts, chat messages or a token tensor, "
            f"got {type(input).__name__}"
        )
    do_sample = wants_sampling(do_sample, temperature, top_k, top_p)
    text_in = not isinstance(input, torch.Tensor)
    single_text = isinstance(input, str) or (text_in and input and isinstance(input[0], dict))
    if text_in:
        tokens, mask = model.tokenize(input, prepend_bos, padding_side="left")  # the new tokens follow every row
    else:
        tokens = input[None] if input.dim() == 1 else input
        mask = torch.ones_like(tokens) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != tokens.shape:
            raise InputError(
                f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape "
                f"{tuple(tokens.shape)}; pass one 0/1 entry per token (0 = padding)"
            )
    if position_ids is not None:
        _check_positions(position_ids, mask)
    limit = model.config.max_position_embeddings
    n_prompt = tokens.shape[-1]
    if n_prompt <= limit < n_prompt + max_new_tokens - 1:  # checked up front: no work is thrown away at the limit
        raise InputError(
            f"the prompt ({n_prompt} tokens) plus {arg('max_new_tokens', max_new_tokens)} needs "
            f"{n_prompt + max_new_tokens - 1} positions but the model supports {limit} "
            f"(max_position_embeddings); lower {arg('max_new_tokens')} to at most {limit - n_prompt + 1} or "
            "shorten the prompt",
            param="max_new_tokens",
        )
    device = model.device
    tokens, mask = tokens.to(device), mask.to(device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = eos_token_id if eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else []))
    tok = model.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else None
    pad = pad if pad is not None else (min(eos_ids) if eos_ids else 0)

    cache = KVCache(model.n_layers) if use_past_kv_cache else None
    finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    out, step_in = tokens, tokens
    steps = range(max_new_tokens)
    if verbose:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate")
    if streamer is not None:
        streamer.put(tokens.cpu())
    for step in steps:
        if cache is not None:
            logits = model(step_in, attention_mask=mask, kv_cache=cache)
            cache.commit(step_in.shape[1])
        else:
            logits = model(out, attention_mask=mask)
        last = logits[:, -1]
        if freq_penalty:
            new = out[:, tokens.shape[1] :]
            counts = torch.zeros_like(last).scatter_add_(-1, new, torch.ones_like(new, dtype=last.dtype))
            last = last - freq_penalty * counts
        nxt = sample_next(last, do_sample, temperature, top_k, top_p, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if streamer is not None:
            streamer.put(nxt.cpu())
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if stop_at_eos and eos_ids and step + 1 >= min_new_tokens:
            finished |= torch.isin(nxt, torch.tensor(sorted(eos_ids), device=device))
            if bool(finished.all()):
                break
        step_in = nxt[:, None]
    if streamer is not None:
        streamer.end()
    if return_type == "tokens" or (return_type == "input" and not text_in):
        return out
    new = out[:, tokens.shape[1] :]
    texts = [tok.decode(row, skip_special_tokens=True) for row in new.tolist()]
    if return_type == "completion":  # the new text only (e.g. an assistant's reply to chat messages)
        return texts[0] if single_text else texts
    prompts = [tok.decode(row[m.bool()].tolist()) for row, m in zip(tokens, mask[:, : tokens.shape[1]])]
    full = [p + t for p, t in zip(prompts, texts)]
    return full[0] if single_text else full
