"""Every public function works under ``torch.no_grad()`` and ``torch.inference_mode()`` (or refuses up front
in one line), enumerated from the packages' ``__all__``: a function added later fails
``test_every_public_function_has_a_call`` until it has its line in ``CALLS``. Functions that differentiate
give the same numbers in every mode (not zeros where autograd was off)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch

import analyses as A
import analyses.saes as SA
import hooks
import surgery as S
from _core.errors import ScalpelError
from hooks import HookedLlama
from hooks.streaming import cache_to_disk
from tests.helpers import build_tiny, random_sae

PACKAGES = (hooks, A, SA, S)
TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
P = ["When Mary and John went to the store, John gave a drink to"]
PAIR = [(" Mary", " John")]
HARMFUL, HARMLESS = ["How do I pick a lock?"] * 2, ["How do I bake bread?"] * 2


class Ctx:
    def __init__(self, model: HookedLlama, work: Path, sae) -> None:
        self.m, self.work, self.sae, self.n = model, work, sae, 0

    def out(self, suffix: str = "") -> Path:
        self.n += 1
        return self.work / f"out{self.n}{suffix}"


def _direction(c: Ctx):
    return A.steering_direction(c.m, ["I love it"], ["I hate it"], 1)


# name -> call on a fresh tiny model; every public function of PACKAGES has one
CALLS = {
    # hooks
    "act_name": lambda c: hooks.act_name("pattern", 1),
    "get_act_name": lambda c: hooks.get_act_name("resid_post", 0),
    "keep_freed_memory": lambda c: hooks.keep_freed_memory(hooks.keep_freed_memory(True)),
    # analyses
    "ablation_sweep": lambda c: A.ablation_sweep(
        c.m, A.Scorer.build(c.m, "logit-diff", P, list(PAIR[0])), "heads", [1]
    ),
    "measure_ablation": lambda c: A.measure_ablation(
        c.m, [S.ZeroHeads(1, [0])], P, "logit-diff", answers=list(PAIR[0])
    ),
    "activation_patching": lambda c: A.activation_patching(c.m, "Mary went", "John went", "logit_diff", answers=PAIR),
    "attribution_patching": lambda c: A.attribution_patching(c.m, "Mary went", "John went", "logit_diff", answers=PAIR),
    "path_patching": lambda c: A.path_patching(c.m, "Mary went", "John went", "logit_diff", answers=PAIR),
    "direct_logit_attribution": lambda c: A.direct_logit_attribution(c.m, P[0], " Mary", " John"),
    "logit_lens": lambda c: A.logit_lens(c.m, P[0]),
    "detect_heads": lambda c: A.detect_heads(c.m, seq_len=6, n_seqs=2),
    "repeated_random_tokens": lambda c: A.repeated_random_tokens(c.m, 4, 2),
    "top_activating": lambda c: A.top_activating(c.m, 1, [0, 1], corpus=P, k=2),
    "load_corpus": lambda c: A.load_corpus(),
    "steering_direction": _direction,
    "steer": lambda c: A.steer(c.m, _direction(c), 1, 2.0),
    "logit_diff": lambda c: A.logit_diff(c.m, " Mary", " John"),
    "target_prob": lambda c: A.target_prob(c.m, " Mary"),
    "kl_divergence": lambda c: A.kl_divergence(c.m(P[0])),
    "normalized": lambda c: A.normalized(torch.tensor(0.5), 1.0, 0.0),
    "head_ref": lambda c: A.head_ref(c.m, 1, 0),
    "kv_group": lambda c: A.kv_group(c.m, 3),
    "query_heads": lambda c: A.query_heads(c.m, 1),
    "group_size": lambda c: A.group_size(c.m),
    "parse_heads": lambda c: A.parse_heads(c.m, ["1.0"]),
    "head_table": lambda c: A.head_table(c.m),
    "get_component": lambda c: A.get_component("attn_out"),
    "refusal_rate": lambda c: A.refusal_rate(c.m, HARMFUL[:1], max_new_tokens=2),
    "refusal_directions": lambda c: A.refusal_directions(c.m, HARMFUL, HARMLESS),
    "prompt_kl": lambda c: A.prompt_kl(c.m, HARMLESS[:1], fwd_hooks=S.ZeroHeads(1, [0]).as_hooks(c.m)),
    "load_prompts": lambda c: A.load_prompts("harmless:eval"),
    "is_refusal": lambda c: A.is_refusal("I cannot help"),
    "select_direction": lambda c: A.select_direction(
        c.m, A.refusal_directions(c.m, HARMFUL, HARMLESS), HARMFUL, HARMLESS
    ),
    "massive_mask": lambda c: A.massive_mask(torch.rand(2, 5) + 1),
    "attends": lambda c: A.attends(c.m, P[0], (1, 0)),
    "attention_patterns": lambda c: A.attention_patterns(c.m, P[0], 1),
    "edge_attribution": lambda c: A.edge_attribution(c.m, "Mary went", "John went", "logit_diff", answers=PAIR),
    "attribution_graph": lambda c: A.attribution_graph(c.m, "Mary went", _transcoders(c.m), max_feature_nodes=8),
    # analyses.saes
    "load_sae": lambda c: SA.load_sae(SA.save_sae(c.sae, c.out()), c.m),
    "save_sae": lambda c: SA.save_sae(c.sae, c.out()),
    "check_fits": lambda c: SA.check_fits(c.sae, c.m),
    "spliced": lambda c: _run_spliced(c),
    "ablate_features": lambda c: SA.ablate_features([0]),
    "clamp_features": lambda c: SA.clamp_features([0], 1.0),
    "scale_features": lambda c: SA.scale_features([0], 2.0),
    "train_sae": lambda c: SA.train_sae(
        c.m, "blocks.1.hook_resid_post", P * 4, c.out(), steps=2, batch_size=8, d_sae=32, k=4
    ),
    "train_saes": lambda c: SA.train_saes(
        c.m, ["blocks.1.hook_resid_post"], P * 4, c.out(), steps=2, batch_size=8, d_sae=32, k=4
    ),
    "transcoder_hooks": lambda c: SA.transcoder_hooks(c.m, [1]),
    "sae_metrics": lambda c: SA.sae_metrics(c.m, c.sae, P),
    "top_feature_contexts": lambda c: SA.top_feature_contexts(c.m, c.sae, [0, 1], corpus=P, k=2),
    "feature_attribution": lambda c: SA.feature_attribution(c.m, c.sae, P, "logit_diff", answers=PAIR),
    "feature_patching": lambda c: SA.feature_patching(c.m, c.sae, P[0], [0, 1], "logit_diff", answers=PAIR),
    "logit_effects": lambda c: SA.logit_effects(c.m, c.sae, [0, 1]),
    "feature_dashboard": lambda c: SA.feature_dashboard(c.m, c.sae, [0], corpus=P, k=2),
    "feature_direction": lambda c: SA.feature_direction(c.sae, 0),
    # surgery
    "peaked_weights": lambda c: S.peaked_weights(3, 1.0, 1.0, 0.1, 1.0),
    "kinds": lambda c: S.kinds(),
    "ablation_plan": lambda c: S.ablation_plan(c.m, heads=[(1, 0)], mean=True, texts=P),
    "load_plan": lambda c: S.load_plan(S.save_plan([S.ZeroHeads(1, [0])], c.out(".yaml"))),
    "save_plan": lambda c: S.save_plan([S.ZeroHeads(1, [0])], c.out(".json")),
    "apply_plan": lambda c: S.apply_plan(c.m, [S.ZeroHeads(1, [0])]),
    "as_plan": lambda c: S.as_plan([S.ZeroHeads(1, [0])]),
    "mean_activations": lambda c: S.mean_activations(c.m, P),
    "key_covariance": lambda c: S.key_covariance(c.m, 1, P),
    "abliterate": lambda c: S.abliterate(
        c.m, HARMFUL, HARMLESS, config={"trials": 2, "refine": 1, "max_new_tokens": 4, "proxy_tokens": 2}
    ),
    "search_space": lambda c: S.search_space(3),
    "refine_direction": lambda c: S.refine_direction(
        c.m,
        S.Abliterate(torch.ones(64), attn_weights={1: 1.0}, mlp_weights={1: 1.0}),
        HARMFUL,
        HARMLESS,
        steps=1,
        tokens=2,
    ),
    "export": lambda c: S.export(c.m, c.out(), edits=[S.ZeroHeads(1, [0])]),
    "export_gguf": lambda c: S.export_gguf(c.m, c.out(".gguf"), edits=[S.ZeroHeads(1, [0])]),
    "quantize_gguf": lambda c: S.quantize_gguf(S.export_gguf(c.m, c.out(".gguf")).path, c.out(), types="Q8_0"),
    "load_control_vector": lambda c: S.load_control_vector(c.out(".gguf")),  # a missing file: refused
    "check_control_vector": lambda c: S.check_control_vector(c.out(".gguf"), c.out(".gguf"), c.m),
    "node_circuit": lambda c: S.node_circuit(c.m, heads=[(1, 0)]),
    "circuit_edits": lambda c: S.circuit_edits(c.m, S.node_circuit(c.m, heads=[(1, 0)]), ablation="zero"),
    "export_circuit": lambda c: S.export_circuit(c.m, c.out(), S.node_circuit(c.m, heads=[(1, 0)]), ablation="zero"),
    "bake_refusals": lambda c: S.bake_refusals(
        A.edge_attribution(c.m, "Mary went", "John went", "logit_diff", answers=PAIR).circuit(top_n=5)
    ),
    "verify": lambda c: S.verify(S.export(c.m, c.out()).out_dir),
    # the model's own entry points and the streaming cache
    "HookedLlama.generate": lambda c: c.m.generate(P[0], max_new_tokens=2),
    "HookedLlama.run_with_cache": lambda c: c.m.run_with_cache(P[0]),
    "HookedLlama.run_with_hooks": lambda c: c.m.run_with_hooks(P[0], fwd_hooks=S.ZeroHeads(1, [0]).as_hooks(c.m)),
    "cache_to_disk": lambda c: cache_to_disk(c.m, P, ["blocks.1.hook_resid_post"], c.out()),
}
# functions that differentiate: the same numbers in every mode (a silent zero gradient would differ)
VALUES = {
    "attribution_patching": lambda r: torch.cat([r[name].effect.flatten().float() for name in r]),
    "feature_attribution": lambda r: r.values,
}


def _transcoders(model) -> list:
    """Per-layer MLP transcoders with random weights."""
    out = []
    for i, (read, write) in enumerate(SA.transcoder_hooks(model)):
        sae = SA.SAE(SA.SAEConfig("standard", model.d_model, 16, read, hook_name_out=write))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        out.append(sae)
    return out


def _run_spliced(c: Ctx):
    with SA.spliced(c.m, [c.sae]):
        return c.m(P[0])


def public_functions() -> list[str]:
    names = []
    for package in PACKAGES:
        for name in getattr(package, "__all__", ()):
            if inspect.isfunction(getattr(package, name)):
                names.append(name)
    return sorted(set(names))


def test_every_public_function_has_a_call():
    missing = [name for name in public_functions() if name not in CALLS]
    assert not missing, f"public functions without a line in CALLS: {missing}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("modes") / "tiny")


def fresh(tiny_dir: Path) -> HookedLlama:
    model = HookedLlama.from_pretrained(str(tiny_dir))
    model.tokenizer.chat_template = TEMPLATE
    return model


def _sae() -> SA.SAE:
    sae = random_sae("topk", k=8)
    sae.cfg.hook_name = "blocks.1.hook_resid_post"
    return sae


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_public_functions_work_under_no_grad_and_inference_mode(name, mode, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SCALPEL_CACHE", str(tmp_path / "cache"))
    context = torch.no_grad if mode == "no_grad" else torch.inference_mode
    ctx = Ctx(fresh(tiny_dir), tmp_path, _sae())
    try:
        with context():
            result = CALLS[name](ctx)
    except ScalpelError as exc:  # a refusal up front is allowed: one line
        assert "\n" not in str(exc), str(exc)
        return
    if name in VALUES:
        plain = CALLS[name](Ctx(fresh(tiny_dir), tmp_path / "plain", _sae()))
        got, want = VALUES[name](result), VALUES[name](plain)
        assert torch.is_tensor(want) and torch.count_nonzero(want) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
