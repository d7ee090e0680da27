"""The TransformerLens surface of ``HookedLlama``: ``cfg``, weight views, ``blocks[i]``, ``loss_fn`` …

Spelled as TransformerLens 4.3 spells them, with the same shapes and meanings, so TransformerLens code
runs unchanged. Weight views are computed from the Hugging Face parameters on each access (never
folded, never copied into the model): ``W_Q`` [layer, head, d_model, d_head], ``W_K`` / ``W_V``
[layer, kv_head, d_model, d_head] (TransformerLens's ``_W_K``: one per key/value head under GQA),
``W_O`` [layer, head, d_head, d_model], ``W_in`` / ``W_gate`` [layer, d_model, d_mlp],
``W_out`` [layer, d_mlp, d_model], ``W_E`` [vocab, d_model], ``W_U`` [d_model, vocab].
"""

from __future__ import annotations

import torch

from . import config as cfg_helpers
from .errors import InputError


class Factored:
    """A matrix kept as a product ``A @ B`` (TransformerLens's ``FactoredMatrix``, the part people use):
    ``AB`` the full product, ``BA``, ``eigenvalues`` (of ``BA``: the non-zero ones of ``AB``), ``svd()``,
    ``T``, ``norm()``, ``shape``, and ``@`` with a tensor or another ``Factored``."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        self.A, self.B = A, B

    @property
    def AB(self) -> torch.Tensor:
        return self.A @ self.B

    @property
    def BA(self) -> torch.Tensor:
        return self.B @ self.A

    @property
    def T(self) -> "Factored":
        return Factored(self.B.transpose(-1, -2), self.A.transpose(-1, -2))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.A.shape[:-1] + self.B.shape[-1:])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def eigenvalues(self) -> torch.Tensor:
        return torch.linalg.eigvals(self.BA)

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U, S, Vh) of ``AB`` [..., m, r], [..., r], [..., r, n] with r the inner size."""
        U, S, Vh = torch.linalg.svd(self.AB, full_matrices=False)
        r = self.A.shape[-1]
        return U[..., :r], S[..., :r], Vh[..., :r, :]

    def norm(self) -> torch.Tensor:
        """Frobenius norm of ``AB``."""
        return self.AB.pow(2).sum((-2, -1)).sqrt()

    def __getitem__(self, idx) -> "Factored":
        idx = idx if isinstance(idx, tuple) else (idx,)
        return Factored(self.A[idx], self.B[idx])

    def __matmul__(self, other):
        if isinstance(other, Factored):
            return Factored(self.A, self.B @ other.AB)
        return Factored(self.A, self.B @ other)

    def __rmatmul__(self, other):
        return Factored(other @ self.A, self.B)

    def __repr__(self) -> str:
        return f"Factored(shape={tuple(self.shape)}, inner={self.A.shape[-1]})"


class TLConfig:
    """``model.cfg``: TransformerLens's config field names, read live from the model's ``LlamaConfig``.

    Settable flags: ``default_prepend_bos`` (False: follow the tokenizer, which for SmolLM2 adds no
    BOS) and ``use_attn_result`` (``set_use_attn_result``).
    """

    _FIELDS = (
        "n_layers",
        "d_model",
        "n_heads",
        "n_key_value_heads",
        "d_head",
        "d_mlp",
        "d_vocab",
        "d_vocab_out",
        "n_ctx",
        "act_fn",
        "eps",
        "normalization_type",
        "positional_embedding_type",
        "rotary_base",
        "rotary_dim",
        "device",
        "dtype",
        "model_name",
        "gated_mlp",
        "final_rms",
        "attn_only",
        "original_architecture",
        "tokenizer_prepends_bos",
        "default_prepend_bos",
        "use_attn_result",
    )

    def __init__(self, model) -> None:
        self._model = model
        self.default_prepend_bos = False
        self.use_attn_result = False
        self.gated_mlp, self.final_rms, self.attn_only = True, True, False
        self.normalization_type, self.positional_embedding_type = "RMS", "rotary"

    n_layers = property(lambda self: self._model.n_layers)
    d_model = property(lambda self: self._model.d_model)
    n_heads = property(lambda self: self._model.n_heads)
    n_key_value_heads = property(lambda self: self._model.n_kv_heads)
    d_head = property(lambda self: self._model.d_head)
    rotary_dim = property(lambda self: self._model.d_head)
    d_mlp = property(lambda self: self._model.d_mlp)
    d_vocab = property(lambda self: self._model.d_vocab)
    d_vocab_out = property(lambda self: self._model.d_vocab)
    n_ctx = property(lambda self: self._model.config.max_position_embeddings)
    act_fn = property(lambda self: self._model.config.hidden_act)
    eps = property(lambda self: self._model.config.rms_norm_eps)
    rotary_base = property(
        lambda self: float(cfg_helpers.rope_parameters(self._model.config).get("rope_theta", 10000.0))
    )
    device = property(lambda self: self._model.device)
    dtype = property(lambda self: self._model.dtype)
    model_name = property(lambda self: self._model.source or "llama")
    original_architecture = property(
        lambda self: (getattr(self._model.config, "architectures", None) or ["LlamaForCausalLM"])[0]
    )

    @property
    def tokenizer_prepends_bos(self) -> bool:
        tok = self._model.tokenizer
        if tok is None or tok.bos_token_id is None:
            return False
        return tok("a")["input_ids"][:1] == [tok.bos_token_id]

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self._FIELDS}

    def __repr__(self) -> str:
        return "TLConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


class _View:
    """A block or sublayer under TransformerLens's attribute names; anything else reads the module."""

    _names: dict = {}

    def __init__(self, module, layer: int, model) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_model", model)

    def __getattr__(self, name):
        target = self._names.get(name)
        if target is None:
            return getattr(self._module, name)
        return target(self)

    def __setattr__(self, name, value) -> None:
        setattr(self._module, name, value)

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self._layer})"


def _per_layer(name: str):
    return lambda view: getattr(view._model, name)[view._layer]


class AttnView(_View):
    _names = {
        n: _per_layer(n)
        for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "_W_K", "_W_V", "_b_K", "_b_V", "OV", "QK")
    }


class MLPView(_View):
    _names = {n: _per_layer(n) for n in ("W_in", "W_gate", "W_out", "b_in", "b_gate", "b_out")}


class NormView(_View):
    _names = {"w": lambda v: v._module.weight}


class BlockView(_View):
    _names = {
        "attn": lambda v: AttnView(v._module.self_attn, v._layer, v._model),
        "mlp": lambda v: MLPView(v._module.mlp, v._layer, v._model),
        "ln1": lambda v: NormView(v._module.input_layernorm, v._layer, v._model),
        "ln2": lambda v: NormView(v._module.post_attention_layernorm, v._layer, v._model),
    }


class TransformerLensMixin:
    """TransformerLens attribute names on ``HookedLlama`` (see the module docstring)."""

    @property
    def cfg(self) -> TLConfig:
        if "_tl_cfg" not in self.__dict__:
            self.__dict__["_tl_cfg"] = TLConfig(self)
        return self.__dict__["_tl_cfg"]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Cache ``attn.hook_result`` (per-head outputs) by default in ``run_with_cache``."""
        self.cfg.use_attn_result = bool(use_attn_result)

    # ----------------------------------------------------------------- blocks
    @property
    def blocks(self) -> list[BlockView]:
        """``blocks[i]`` with TransformerLens's names: ``.attn.W_Q``, ``.mlp.W_in``, ``.ln1.w``, hook points."""
        return [BlockView(layer, i, self) for i, layer in enumerate(self.model.layers)]

    @property
    def ln_final(self):
        return NormView(self.model.norm, -1, self)

    # ----------------------------------------------------------------- weights
    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(layer) for layer in self.model.layers])

    def _heads_in(self, proj, n: int) -> torch.Tensor:  # Linear [n*D, M] -> [n, M, D]
        return proj.weight.view(n, self.d_head, self.d_model).transpose(1, 2)

    def _bias(self, proj, shape) -> torch.Tensor:
        if proj.bias is None:
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        return proj.bias.view(shape)

    @property
    def W_E(self) -> torch.Tensor:
        return self.model.embed_tokens.weight

    @property
    def b_U(self) -> torch.Tensor:
        return torch.zeros(self.d_vocab, device=self.device, dtype=self.dtype)

    @property
    def W_Q(self) -> torch.Tensor:
        return self._stack(lambda l: self._heads_in(l.self_attn.q_proj, self.n_heads))

    @property
    def W_K(self) -> torch.Tensor:
        return self._stack(lambda l: self._heads_in(l.self_attn.k_proj, self.n_kv_heads))

    @property
    def W_V(self) -> torch.Tensor:
        return self._stack(lambda l: self._heads_in(l.self_attn.v_proj, self.n_kv_heads))

    _W_K, _W_V = W_K, W_V

    @property
    def W_O(self) -> torch.Tensor:
        return self._stack(
            lambda l: l.self_attn.o_proj.weight.view(self.d_model, self.n_heads, self.d_head).permute(1, 2, 0)
        )

    @property
    def b_Q(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.self_attn.q_proj, (self.n_heads, self.d_head)))

    @property
    def b_K(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.self_attn.k_proj, (self.n_kv_heads, self.d_head)))

    @property
    def b_V(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.self_attn.v_proj, (self.n_kv_heads, self.d_head)))

    _b_K, _b_V = b_K, b_V

    @property
    def b_O(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.self_attn.o_proj, (self.d_model,)))

    @property
    def W_in(self) -> torch.Tensor:
        return self._stack(lambda l: l.mlp.up_proj.weight.T)

    @property
    def W_gate(self) -> torch.Tensor:
        return self._stack(lambda l: l.mlp.gate_proj.weight.T)

    @property
    def W_out(self) -> torch.Tensor:
        return self._stack(lambda l: l.mlp.down_proj.weight.T)

    @property
    def b_in(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.mlp.up_proj, (self.d_mlp,)))

    @property
    def b_gate(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.mlp.gate_proj, (self.d_mlp,)))

    @property
    def b_out(self) -> torch.Tensor:
        return self._stack(lambda l: self._bias(l.mlp.down_proj, (self.d_model,)))

    def _per_query_head(self, w: torch.Tensor) -> torch.Tensor:  # [L, G, ...] -> [L, H, ...]
        return w.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)

    @property
    def OV(self) -> Factored:
        """``W_V @ W_O`` per query head, [layer, head, d_model, d_model] (kept factored)."""
        return Factored(self._per_query_head(self.W_V), self.W_O)

    @property
    def QK(self) -> Factored:
        """``W_Q @ W_K^T`` per query head, [layer, head, d_model, d_model] (kept factored; no RoPE)."""
        return Factored(self.W_Q, self._per_query_head(self.W_K).transpose(-1, -2))

    # ----------------------------------------------------------------- losses and directions
    def loss_fn(
        self,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        per_token: bool = False,
    ) -> torch.Tensor:
        """Next-token cross-entropy of ``logits`` [B, P, V] on ``tokens`` [B, P]; mean, or [B, P-1] per token."""
        padding = None if attention_mask is None else torch.as_tensor(attention_mask).bool()
        return self.loss_from_logits(logits, tokens, padding, per_token=per_token)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """Unembedding direction(s) of ``tokens`` (id, single-token string, or id tensor): [..., d_model]."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.lm_head.weight.device)
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.d_vocab):
            raise InputError(f"token ids must be in 0..{self.d_vocab - 1}")
        return self.lm_head.weight[ids]
