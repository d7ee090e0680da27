"""The sparse autoencoder (and transcoder) module: encode, decode, and a forward with an error term.

One class covers the architectures public releases use; parameters keep SAELens's names and shapes
(``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_out], ``b_enc``, ``b_dec``, ``threshold``, ``b_gate``,
``r_mag``, ``b_mag``) so the SAELens layout loads and saves as an identity map.

=============  ====================================================================================
architecture   feature activations ``f`` from ``h = sae_in @ W_enc + b_enc`` (``hook_sae_acts_pre``)
=============  ====================================================================================
standard       ``relu(h)``
jumprelu       ``relu(h) * (h > threshold)``
topk           the ``k`` largest entries of ``h``, passed through relu, others 0
gated          ``(sae_in @ W_enc + b_gate > 0) * relu(sae_in @ (W_enc * exp(r_mag)) + b_mag)``
=============  ====================================================================================

``sae_in = normalize(x) - b_dec`` when ``apply_b_dec_to_input`` (else ``normalize(x)``); the
reconstruction is ``denormalize(f @ W_dec + b_dec)`` (plus ``x @ W_skip.T`` for a sparsify skip
connection). Spliced into a model, ``forward`` returns ``reconstruction + error`` where the error is the
clean reconstruction's residual, computed without gradient and without the module's hooks (as
SAELens does), so the model's output is unchanged unless a hook edits the features.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hooks import HookPoint, InputError

ARCHITECTURES = ("standard", "gated", "jumprelu", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class SAEConfig:
    """Shape and behaviour of one SAE. ``hook_name`` is where it reads (a hook point of our model);
    a transcoder also has ``hook_name_out``, where it writes, and ``d_out``."""

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str
    hook_name_out: str | None = None
    d_out: int | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    skip_connection: bool = False
    rescale_acts_by_decoder_norm: bool = False
    dtype: str = "float32"
    source_format: str = "saelens"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae", "d_out"):
            value = getattr(self, name)
            if (value is not None or name != "d_out") and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise InputError(f"SAEConfig {name} must be an integer >= 1, got {value!r}", param=name)
        if self.dtype not in DTYPES:
            raise InputError(f"SAEConfig dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", param="dtype")
        for name in ("hook_name", "hook_name_out"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"SAEConfig {name} must be a hook name (text), got {value!r}", param=name)
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"unknown SAE architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise InputError(
                f"unknown normalize_activations {self.normalize_activations!r}; supported: {', '.join(NORMALIZATIONS)}"
            )
        if self.architecture == "topk" and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            raise InputError(f"a topk SAE needs 0 < k <= d_sae ({self.d_sae}), got k={self.k!r}")
        if self.d_out is None:
            self.d_out = self.d_in
        if self.is_transcoder:  # b_dec lives in the output space: never subtracted from the input
            self.apply_b_dec_to_input = False

    @property
    def is_transcoder(self) -> bool:
        return self.hook_name_out is not None and self.hook_name_out != self.hook_name

    def to_dict(self) -> dict:
        return asdict(self)


class SAE(nn.Module):
    """A sparse autoencoder or transcoder with SAELens hook points (``hook_sae_input``,
    ``hook_sae_acts_pre``, ``hook_sae_acts_post``, ``hook_sae_recons``, ``hook_sae_error``,
    ``hook_sae_output``). ``use_error_term`` (default True) adds the reconstruction error back when
    spliced, so only edits of the features change the model.

    Example::

        sae = load_sae("path/to/sae", model)
        with model.saes([sae]):
            logits, cache = model.run_with_cache("The cat sat")
        cache[f"{sae.hook_name}.hook_sae_acts_post"]     # [batch, pos, d_sae]
    """

    def __init__(self, cfg: SAEConfig, use_error_term: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        dtype = getattr(torch, cfg.dtype)
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.d_out
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        if cfg.architecture == "gated":
            del self.b_enc
            self.b_gate = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
            self.r_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
            self.b_mag = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, dtype=dtype))
        self.input_scale: torch.Tensor | None = None  # [d_in] multiplied into the input (a folded norm weight)
        self.hook_sae_input = HookPoint("hook_sae_input")
        self.hook_sae_acts_pre = HookPoint("hook_sae_acts_pre")
        self.hook_sae_acts_post = HookPoint("hook_sae_acts_post")
        self.hook_sae_recons = HookPoint("hook_sae_recons")
        self.hook_sae_error = HookPoint("hook_sae_error")
        self.hook_sae_output = HookPoint("hook_sae_output")
        self._quiet = False

    # ------------------------------------------------------------------ facts
    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def hook_name_out(self) -> str | None:
        return self.cfg.hook_name_out if self.cfg.is_transcoder else None

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def hook_points(self) -> list[HookPoint]:
        return [
            self.hook_sae_input,
            self.hook_sae_acts_pre,
            self.hook_sae_acts_post,
            self.hook_sae_recons,
            self.hook_sae_error,
            self.hook_sae_output,
        ]

    def _hook(self, point: HookPoint, x: torch.Tensor) -> torch.Tensor:
        return x if self._quiet else point(x)

    # ------------------------------------------------------------------ maths
    def _normalize_in(self, x: torch.Tensor):
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = (self.cfg.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * scale, ("scale", scale)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            xc = x - mu
            std = xc.std(dim=-1, keepdim=True)
            return xc / (std + 1e-5), ("ln", mu, std)
        return x, None  # "expected_average_only_in": SAELens folds the factor into the weights; identity here

    @staticmethod
    def _normalize_out(y: torch.Tensor, state) -> torch.Tensor:
        if state is None:
            return y
        if state[0] == "scale":
            return y / state[1]
        return y * state[2] + state[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of input activations [..., d_in]."""
        acts, _ = self._encode(x)
        return acts

    def _encode(self, x: torch.Tensor):
        x = x.to(self.W_enc.dtype)
        if self.input_scale is not None:
            x = x * self.input_scale
        x = self._hook(self.hook_sae_input, x)
        x, norm_state = self._normalize_in(x)
        sae_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        arch = self.cfg.architecture
        if arch == "gated":
            active = (sae_in @ self.W_enc + self.b_gate > 0).to(sae_in.dtype)
            pre = self._hook(self.hook_sae_acts_pre, sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
            acts = active * torch.relu(pre)
        else:
            pre = self._hook(self.hook_sae_acts_pre, sae_in @ self.W_enc + self.b_enc)
            if arch == "standard":
                acts = torch.relu(pre)
            elif arch == "jumprelu":
                acts = torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
            else:  # topk
                if self.cfg.rescale_acts_by_decoder_norm:
                    pre = pre * self.W_dec.norm(dim=-1)
                top = pre.topk(self.cfg.k, dim=-1)
                acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        return self._hook(self.hook_sae_acts_post, acts), norm_state

    def decode(self, acts: torch.Tensor, x: torch.Tensor | None = None, _norm_state=None) -> torch.Tensor:
        """Reconstruction [..., d_out] of feature activations [..., d_sae] (``x``: the input, needed only
        for per-token normalisation; a skip connection is added by ``forward`` / ``reconstruct``)."""
        if (
            _norm_state is None
            and x is not None
            and self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm")
        ):
            _, _norm_state = self._normalize_in(x.to(self.W_dec.dtype))
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            acts = acts / self.W_dec.norm(dim=-1)
        out = acts @ self.W_dec + self.b_dec
        out = self._hook(self.hook_sae_recons, out)
        if not self.cfg.is_transcoder:
            out = self._normalize_out(out, _norm_state)
        return out

    def _with_skip(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A skip transcoder adds ``x @ W_skip.T`` to the decoded output (not part of ``decode``, as in SAELens)."""
        if not self.cfg.skip_connection:
            return out
        xin = x.to(self.W_skip.dtype)
        return out + (xin * self.input_scale if self.input_scale is not None else xin) @ self.W_skip.T

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``decode(encode(x))`` without running hooks."""
        with self.quiet():
            acts, state = self._encode(x)
            return self._with_skip(self.decode(acts, x, state), x)

    def quiet(self):
        """Context manager: the module's hook points are skipped."""
        import contextlib

        @contextlib.contextmanager
        def _quiet():
            old, self._quiet = self._quiet, True
            try:
                yield self
            finally:
                self._quiet = old

        return _quiet()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Spliced output: reconstruction (+ error when ``use_error_term``) in ``x``'s dtype.

        A transcoder is called with its input ``x`` and the tensor it replaces, ``target``.
        """
        target = x if target is None else target
        acts, state = self._encode(x)
        recons = self._with_skip(self.decode(acts, x, state), x)
        if self.use_error_term:
            with torch.no_grad():
                clean = recons if not self._edited() else self.reconstruct(x)
                error = self._hook(self.hook_sae_error, target.to(clean.dtype) - clean.detach())
            recons = recons + error
        return self._hook(self.hook_sae_output, recons.to(target.dtype))

    def _edited(self) -> bool:
        """Whether a hook could have changed the features or the reconstruction."""
        return any(
            p.fwd_hooks
            for p in (self.hook_sae_input, self.hook_sae_acts_pre, self.hook_sae_acts_post, self.hook_sae_recons)
        )

    def extra_repr(self) -> str:
        c = self.cfg
        kind = "transcoder" if c.is_transcoder else "SAE"
        k = f", k={c.k}" if c.k else ""
        out = f" -> {c.hook_name_out}" if c.is_transcoder else ""
        return f"{c.architecture} {kind} d_in={c.d_in}, d_sae={c.d_sae}{k}, at {c.hook_name}{out}"
