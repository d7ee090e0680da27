"""Reconstruction metrics of an SAE on a model: MSE, fraction of variance explained, L0, CE-loss recovered
and the KL of the spliced model to the clean one.

Every number is taken over the **measured positions**: the real (non-padding) tokens of ``texts``,
less each text's first token with ``skip_first`` (the default, as in training: its residual is a
massive activation an SAE is not trained on) and, with ``outlier_ratio``, less every token whose input
norm exceeds that many times the batch's median. Only measured positions are replaced; the others keep
their own activation.

- ``mse``: mean over measured tokens and dimensions of ``(target - reconstruction)²``;
- ``fve``: ``1 - Σ‖target - recon‖² / Σ‖target - mean(target)‖²`` over measured tokens;
- ``l0``: mean number of active features per measured token; ``frequency`` [d_sae]: the fraction of
  measured tokens on which each feature fired; ``dead``: features that fired on no measured token of
  ``texts`` (a first token or an outlier does not make a feature alive);
- ``ce_clean`` / ``ce_spliced`` / ``ce_zero``: mean next-token loss of the clean model, of the model
  with the reconstruction in place of the activation (no error term) and with the activation set to 0,
  over the predictions *made at* measured positions (the prediction made at a text's first token is left
  out with ``skip_first``: nothing is replaced there, so it would only dilute the numbers);
  ``ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``;
- ``kl``: mean KL(clean ‖ spliced) of the next-token distributions over the same predictions.

Reading a massive activation (``skip_first=False``, or a massive token elsewhere with no
``outlier_ratio``) issues a ``MassiveActivationWarning`` naming the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hooks import InputError

from ..divergence import kl_rows
from ..massive import RATIO, warn_if_massive
from ..neurons import _batches, load_corpus
from ..results import AnalysisResult, jsonable
from .sae import SAE

if TYPE_CHECKING:
    from hooks.model import HookedLlama


@dataclass
class SAEMetrics(AnalysisResult):
    """Reconstruction and downstream-loss numbers of one SAE (see the module docstring)."""

    hook_name: str
    mse: float
    fve: float
    l0: float
    dead: int
    d_sae: int
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    kl: float
    n_tokens: int
    frequency: torch.Tensor  # [d_sae] fraction of tokens on which each feature fired

    @property
    def title(self) -> str:
        return f"SAE at {self.hook_name}: reconstruction metrics"

    def rows(self) -> list[dict]:
        keys = ("mse", "fve", "l0", "dead", "ce_clean", "ce_spliced", "ce_zero", "ce_recovered", "kl", "n_tokens")
        return [{"metric": k, "value": getattr(self, k)} for k in keys]

    def to_dict(self) -> dict:
        return jsonable(
            {
                **{r["metric"]: r["value"] for r in self.rows()},
                "hook_name": self.hook_name,
                "d_sae": self.d_sae,
                "frequency": self.frequency,
            }
        )

    def figure(self):
        """Histogram of log10 feature firing frequency (dead features at the left edge)."""
        import plotly.graph_objects as go

        freq = self.frequency.clamp(min=1e-7).log10()
        fig = go.Figure(go.Histogram(x=freq.tolist(), nbinsx=50))
        fig.update_layout(
            title=f"{self.title} — FVE {self.fve:.3f}, L0 {self.l0:.1f}, CE recovered {self.ce_recovered:.3f}",
            xaxis_title="log10 firing frequency",
            yaxis_title="features",
            template="plotly_white",
        )
        return fig


def _keep_mask(mask: torch.Tensor, skip_first: bool) -> torch.Tensor:
    keep = mask.bool().clone()
    if skip_first:
        keep[torch.arange(keep.shape[0]), keep.float().argmax(dim=1)] = False
    return keep


def replace_hook(sae: SAE, keep: torch.Tensor, mode: str, inputs: dict):
    """Hook for the SAE's write point: the reconstruction (``mode="sae"``) or 0 (``"zero"``) at the
    ``keep`` positions [B, P]; elsewhere the activation stays. A transcoder reads its input from ``inputs``."""

    def replace(t: torch.Tensor, hook) -> torch.Tensor:
        if mode == "zero":
            new = torch.zeros_like(t)
        else:
            x = inputs.get("x", t)
            new = sae.reconstruct(x).to(t.dtype)
        return torch.where(keep[..., None].to(t.device), new, t)

    return replace


def sae_metrics(
    model: HookedLlama,
    sae: SAE,
    texts=None,
    *,
    batch_size: int = 16,
    max_tokens: int = 128,
    skip_first: bool = True,
    outlier_ratio: float | None = None,
) -> SAEMetrics:
    """Reconstruction metrics of ``sae`` on ``texts`` (default: the shipped corpus).

    ``outlier_ratio``: tokens whose input norm exceeds this many times the batch's median norm are
    treated like first tokens (kept, not counted). Rare massive activations (norms 10-100× the others on
    SmolLM2's middle layers) otherwise dominate the pooled variance and inflate FVE.

    Example::

        m = sae_metrics(model, sae)
        m.fve, m.l0, m.ce_recovered
    """
    from .formats import check_fits

    check_fits(sae, model)
    texts = load_corpus(texts) if texts is None or isinstance(texts, str) else list(texts)
    if not texts:
        raise InputError("sae_metrics needs at least one text")
    read, write = sae.hook_name, sae.hook_name_out or sae.hook_name
    sse = sst_sq = 0.0
    sum_vec = None
    n = active = 0
    fired = torch.zeros(sae.d_sae, dtype=torch.float64)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    kl_sum, n_pred = 0.0, 0
    read_norms: list[torch.Tensor] = []
    refs: list[torch.Tensor] = []
    with torch.no_grad():
        for _, tokens, mask in _batches(model, texts, batch_size, max_tokens):
            tokens, mask = tokens.to(model.device), mask.to(model.device)
            logits, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=sorted({read, write}))
            keep = _keep_mask(mask, skip_first)
            x, target = cache[read], cache[write]
            if outlier_ratio is not None:
                norms = x.float().norm(dim=-1)
                keep = keep & (norms <= outlier_ratio * norms[keep.to(x.device)].median()).to(keep.device)
            acts = sae.encode(x)
            recon = sae.reconstruct(x).to(target.dtype)
            k = keep.to(x.device)
            measured = x.float().norm(dim=-1)[k].cpu()
            read_norms.append(measured)
            refs.append(torch.full_like(measured, float(measured.median()) if measured.numel() else 1.0))
            t_keep, r_keep = target[k].double(), recon[k].double()
            sse += float((t_keep - r_keep).pow(2).sum())
            sum_vec = t_keep.sum(0) if sum_vec is None else sum_vec + t_keep.sum(0)
            sst_sq += float(t_keep.pow(2).sum())
            n += int(k.sum())
            nz = acts[k] > 0
            active += int(nz.sum())
            fired += nz.sum(0).double().cpu()
            inputs = {"x": x} if sae.hook_name_out else {}
            runs = {"clean": logits}
            for mode in ("sae", "zero"):
                runs[mode] = model.run_with_hooks(
                    tokens, attention_mask=mask, fwd_hooks=[(write, replace_hook(sae, k, mode, inputs))]
                )
            # the predictions made at measured positions (of the next real token)
            valid = k[:, :-1].to(mask.device) & mask[:, 1:].bool()
            for mode, lg in runs.items():
                nll = model.loss_from_logits(lg, tokens, None, per_token=True)
                ce[mode] += float(nll[valid].double().sum())
            kl = kl_rows(logits[:, :-1], runs["sae"][:, :-1], dtype=torch.float32)  # KL(clean ‖ spliced) per token
            kl_sum += float(kl[valid].double().sum())
            n_pred += int(valid.sum())
    if n == 0 or n_pred == 0:
        raise InputError("the texts are too short: no token is left to measure; pass longer texts")
    warn_if_massive(
        "sae_metrics",
        read,
        torch.cat(read_norms),
        torch.cat(refs),
        "they dominate FVE and MSE; leave them out with "
        + ("skip_first=True (first tokens) and " if not skip_first else "")
        + f"outlier_ratio={RATIO:g}",
    )
    sst = sst_sq - float(sum_vec.pow(2).sum()) / n
    ce = {m: v / n_pred for m, v in ce.items()}
    recovered = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan")
    freq = (fired / n).float()
    return SAEMetrics(
        hook_name=write,
        mse=sse / (n * recon.shape[-1]),
        fve=1.0 - sse / sst,
        l0=active / n,
        dead=int((fired == 0).sum()),
        d_sae=sae.d_sae,
        ce_clean=ce["clean"],
        ce_spliced=ce["sae"],
        ce_zero=ce["zero"],
        ce_recovered=recovered,
        kl=kl_sum / n_pred,
        n_tokens=n,
        frequency=freq,
    )
