"""The probes an export is checked on: fixed short prompts (or fixed random ids without a tokenizer), their
logits in the in-memory model and in a reloaded one, the tolerance, the top-5 records and the KL to base
(``analyses.divergence.kl_rows`` at the last position)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from analyses.divergence import kl_rows

from ..errors import ExportError

if TYPE_CHECKING:
    from hooks import HookedLlama

FP32_TOLERANCE = 1e-4
PROBE_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return",
    "In 1969, the first person to walk on the Moon was",
)
N_RANDOM_PROBES, RANDOM_PROBE_LEN, RANDOM_PROBE_SEED = 3, 8, 0


@dataclass
class Probe:
    text: str | None
    ids: torch.Tensor  # [1, P]


def probe_inputs(model: HookedLlama, prompts: Sequence[str] | None = None) -> list[Probe]:
    """Fixed short prompts (with a tokenizer) or fixed random token ids (without one)."""
    if model.tokenizer is not None:
        texts = list(prompts) if prompts is not None else list(PROBE_PROMPTS)
        return [Probe(t, model.to_tokens(t).cpu()) for t in texts]
    if prompts is not None:
        raise ExportError(
            "probe_prompts need a tokenizer and this model has none; leave probe_prompts unset", param="probe_prompts"
        )
    g = torch.Generator().manual_seed(RANDOM_PROBE_SEED)
    return [
        Probe(None, torch.randint(0, model.d_vocab, (1, RANDOM_PROBE_LEN), generator=g)) for _ in range(N_RANDOM_PROBES)
    ]


def _input_device(model: torch.nn.Module) -> torch.device:
    """Where token ids go: the embeddings' device (the CPU when accelerate keeps them offloaded)."""
    device = model.model.embed_tokens.weight.device  # HookedLlama and transformers' *ForCausalLM alike
    return torch.device("cpu") if device.type == "meta" else device


def _batch(probes: list[Probe], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The probes as one right-padded batch: (ids [B, P], attention mask [B, P]). With right padding and a
    causal model no real position attends to a pad, so each probe's logits are its own."""
    n = max(p.ids.shape[1] for p in probes)
    ids = torch.zeros(len(probes), n, dtype=torch.long)
    mask = torch.zeros(len(probes), n, dtype=torch.long)
    for i, p in enumerate(probes):
        ids[i, : p.ids.shape[1]], mask[i, : p.ids.shape[1]] = p.ids[0], 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def probe_logits(model: HookedLlama, probes: list[Probe]) -> list[torch.Tensor]:
    """The model's logits on each probe, every position: ``[P, V]`` float32 CPU tensors (one forward pass
    for all probes: a pass reads every weight once, whatever the batch)."""
    ids, mask = _batch(probes, _input_device(model))
    out = model(ids, attention_mask=mask)
    return [out[i, : p.ids.shape[1]].float().cpu() for i, p in enumerate(probes)]


@torch.no_grad()
def hf_logits(hf: torch.nn.Module, probes: list[Probe]) -> list[torch.Tensor]:
    """A transformers model's logits on each probe (as ``probe_logits``)."""
    ids, mask = _batch(probes, _input_device(hf))
    out = hf(ids, attention_mask=mask).logits
    return [out[i, : p.ids.shape[1]].float().cpu() for i, p in enumerate(probes)]


def kl_last(base: torch.Tensor, edited: torch.Tensor) -> float:
    """KL(base ‖ edited) at the last position, in nats (``kl_rows``)."""
    return float(kl_rows(base[-1], edited[-1]))


def top5(logits: torch.Tensor, tokenizer) -> list[dict]:
    probs = logits[-1].double().softmax(-1)
    top = probs.topk(min(5, probs.shape[0]))
    out = []
    for pr, i in zip(top.values.tolist(), top.indices.tolist()):
        entry = {"id": i, "prob": float(f"{pr:.6g}")}
        if tokenizer is not None:
            entry["token"] = tokenizer.decode([i])
        out.append(entry)
    return out


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def tolerance(dtype: torch.dtype, logits: list[torch.Tensor]) -> float:
    """≤ 1e-4 in float32; in half precision 8 ulp of the largest logit."""
    if dtype == torch.float32:
        return FP32_TOLERANCE
    scale = max(float(x.abs().max()) for x in logits)
    return max(FP32_TOLERANCE, 8 * torch.finfo(dtype).eps * scale)
