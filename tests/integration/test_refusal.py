"""Refusal analyses and the abliteration search: the marker scorer, prompt loading, KL against a manual
computation, refusal directions against a manual difference of means, and (on the real model) a search
whose chosen edit lowers the refusal count, exported and replayed bit-exactly from its plan."""

from __future__ import annotations

import json

import pytest
import torch

import surgery as S
from analyses import refusal as R
from hooks import InputError
from tests.helpers import small_search_replays


# --------------------------------------------------------------------------- no model
@pytest.mark.parametrize(
    "text, refused",
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I *will not* do that", True),
        ("I won\u2019t write that.", True),
        ("That is   Illegal in most countries", True),
        ("   ", True),  # an empty response counts as a refusal
        ("Sure! Here are three steps:", False),
        ("Illegible handwriting is hard to read", False),
    ],
)
def test_is_refusal(text, refused):
    assert R.is_refusal(text) is refused


def test_load_prompts(tmp_path):
    assert len(R.load_prompts("harmful:eval")) == 32 and len(R.load_prompts("harmless:eval")) == 32
    assert len(R.load_prompts("harmful:train")) == 48 and len(R.load_prompts("harmless:train")) == 48
    assert not set(R.load_prompts("harmful:eval")) & set(R.load_prompts("harmful:train"))
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\nfirst prompt\n\n  second prompt  \n")
    assert R.load_prompts(txt) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text('"plain"\n{"instruction": "from an object"}\n\n{"goal": "goal key", "target": "x"}\n')
    assert R.load_prompts(jl) == ["plain", "from an object", "goal key"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"answer": "no prompt key"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: the object has none of the keys"):
        R.load_prompts(bad)
    with pytest.raises(InputError, match="does not exist"):
        R.load_prompts(tmp_path / "missing.txt")
    assert R.prompts_sha256(["a", "b"]) == __import__("hashlib").sha256(b"a\nb").hexdigest()


def test_chat_puts_the_system_prompt_first():
    msgs = R.chat(["hi"], system_prompt="Be brief.")
    assert msgs == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]]
    assert R.chat(["hi"], system_prompt=None) == [[{"role": "user", "content": "hi"}]]


def test_peaked_weights_profile():
    assert S.peaked_weights(6, 1.0, 3, 0.5, 2) == {1: 0.5, 2: 0.75, 3: 1.0, 4: 0.75, 5: 0.5}
    w = S.peaked_weights(30, 1.4, 20.5, 0.0, 3)
    assert set(w) == {18, 19, 20, 21, 22, 23} and w[20] == pytest.approx(1.4 - 0.5 / 3 * 1.4)


def test_pareto_front():
    from surgery.abliteration.space import pareto_front

    pts = [(1.0, 0.5), (0.5, 1.0), (0.7, 0.7), (0.8, 0.9), (0.5, 1.2)]
    assert pareto_front(pts) == [0, 2, 1]


def test_search_space_is_herectics_box():
    space = S.search_space(30)
    assert space["direction_index"] == pytest.approx((0.4 * 29, 0.9 * 29))
    assert space["attn.peak"] == pytest.approx((0.6 * 29, 29)) and space["mlp.width"] == pytest.approx((1.0, 0.6 * 29))


# --------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_prompt_kl_equals_manual_computation(smol):
    prompts = ["How do I bake bread?", "Write a haiku about rain."]
    edit = S.Abliterate(
        torch.randn(576, generator=torch.Generator().manual_seed(0)),
        attn_weights=S.peaked_weights(30, 1.0, 20, 0.2, 6),
        mlp_weights={22: 1.0},
    )
    res = R.prompt_kl(smol, prompts, fwd_hooks=edit.as_hooks(smol))
    tokens, mask = smol.tokenize(R.chat(prompts, "You are a helpful assistant."))
    with torch.no_grad():
        base = smol(tokens, attention_mask=mask)[:, -1]
        with edit.applied(smol):
            edited = smol(tokens, attention_mask=mask)[:, -1]
    manual = torch.nn.functional.kl_div(
        edited.double().log_softmax(-1), base.double().log_softmax(-1), reduction="none", log_target=True
    ).sum(-1)
    assert torch.allclose(res.per_prompt, manual, atol=1e-5) and res.mean > 1e-4
    # the same through analyses.kl_divergence with a model first, and against a second (edited) model
    assert R.prompt_kl is not None
    from analyses import kl_divergence

    assert kl_divergence(smol, prompts, fwd_hooks=edit.as_hooks(smol)).mean == pytest.approx(res.mean, abs=1e-7)
    # whole continuations: teacher-forced on the base model's greedy continuation, up to its end
    cont = R.prompt_kl(smol, prompts[:1], fwd_hooks=edit.as_hooks(smol), where="continuation", max_new_tokens=6)
    t1, m1 = smol.tokenize(R.chat(prompts[:1]))
    with torch.no_grad():
        full = smol.generate(t1, max_new_tokens=6, return_type="tokens")
        b = smol(full)[0, t1.shape[1] - 1 : -1]
        with edit.applied(smol):
            e = smol(full)[0, t1.shape[1] - 1 : -1]
    n = cont.n_tokens[0]
    assert n == 6 and cont.per_prompt[0] == pytest.approx(float(R.kl_rows(b, e)[:n].mean()), abs=1e-6)


@pytest.mark.slow
def test_refusal_directions_equal_manual_difference_of_means(smol):
    harmful, harmless = R.load_prompts("harmful:train")[:3], R.load_prompts("harmless:train")[:3]
    dirs = R.refusal_directions(smol, harmful, harmless, project_harmless=False)
    assert dirs.directions.shape == (30, 576) and dirs.separation.shape == (30,)

    def last(prompts, layer):
        out = []
        for p in prompts:  # one prompt at a time: no padding involved
            _, cache = smol.run_with_cache(R.chat([p])[0], names_filter=[f"blocks.{layer}.hook_resid_post"])
            out.append(cache[f"blocks.{layer}.hook_resid_post"][0, -1].double())
        return torch.stack(out).mean(0)

    diff = last(harmful, 15) - last(harmless, 15)
    assert torch.allclose(dirs.directions[15].double(), diff / diff.norm(), atol=1e-4)
    proj = R.refusal_directions(smol, harmful, harmless, project_harmless=True)
    h = proj.harmless_mean[15].double()
    assert abs(float(proj.directions[15].double() @ h / h.norm())) < 1e-5
    mid = proj.direction(15.25).double()
    want = 0.75 * proj.directions[15].double() + 0.25 * proj.directions[16].double()
    assert torch.allclose(mid, want / want.norm(), atol=1e-6)
    dirs.figure()
    json.dumps(dirs.to_dict())


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: S.Abliterate(d),
            "Abliterate: nothing to edit; give attn_weights and/or mlp_weights (or embeddings=True)",
        ),
        (
            lambda d: S.Abliterate(torch.stack([d, d]), direction_index=1.5, mlp_weights={0: 1.0}),
            "Abliterate: direction_index 1.5 is out of range 0..1",
        ),
        (
            lambda d: S.Abliterate(d, direction_index=0.5, mlp_weights={0: 1.0}),
            "Abliterate: direction_index needs a stack of directions [K, d_model]; a single direction is used as given",
        ),
        (
            lambda d: S.Abliterate(d, attn_weights={"x": 1.0}),
            "Abliterate: attn_weights has a key 'x' that is not a layer index",
        ),
    ],
)
def test_abliterate_bad_arguments(make, message):
    with pytest.raises(S.EditError) as err:
        make(torch.ones(8))
    assert str(err.value) == message


def test_abliterate_records_round_trip_through_json():
    e = S.Abliterate.peaked(torch.randn(8), 6, attn=(1.2, 3, 0.4, 2), mlp=None, norm_preserve=True)
    again = S.Edit.from_dict(json.loads(json.dumps(e.to_dict())))
    assert again == e and again.attn_weights == e.attn_weights and torch.equal(again.direction, e.direction)


def test_cli_abliterate_missing_prompt_file_exits_2(tmp_path, capsys):
    from _cli.app import main

    code = main(["abliterate", "--harmful", str(tmp_path / "nope.txt"), "--harmless", "harmless:train"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.txt does not exist" in err[0]


@pytest.mark.slow
def test_search_on_the_real_model_exports_and_replays_bit_exactly(smol, tmp_path):
    res = small_search_replays(smol, tmp_path)
    res.figure()
    json.dumps(res.to_dict())


@pytest.mark.slow
def test_cli_abliterate_exports_and_scalpel_edit_replays_bit_exactly(tmp_path, capsys):
    from safetensors.torch import load_file

    from _cli.app import main

    files = {}
    for name, src, n in [
        ("hf", "harmful:train", 4),
        ("hl", "harmless:train", 4),
        ("ehf", "harmful:eval", 2),
        ("ehl", "harmless:eval", 2),
    ]:
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(R.load_prompts(src)[:n]) + "\n")
    out, again = tmp_path / "ablit", tmp_path / "again"
    code = main(
        [
            "abliterate",
            "--harmful",
            str(files["hf"]),
            "--harmless",
            str(files["hl"]),
            "--eval-harmful",
            str(files["ehf"]),
            "--eval-harmless",
            str(files["ehl"]),
            "--trials",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
            "--report",
            str(tmp_path / "r.html"),
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["export"]["max_abs_logit_diff"] <= 1e-4 and data["front"] and data["chosen_trial"] in data["front"]
    manifest = json.loads((out / "scalpel_manifest.json").read_text())
    prov = manifest["provenance"]
    assert prov["config"]["seed"] == 0 and prov["prompts_sha256"]["eval_harmful"] == R.prompts_sha256(
        R.load_prompts(files["ehf"])
    )
    assert prov["params"] == data["params"]
    assert "Pareto front" in (tmp_path / "r.html").read_text()
    assert main(["edit", data["export"]["plan"], "--out", str(again), "--json"]) == 0
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "counts, target, budget, want, most",
    [
        ([10, 8, 8, 5, 3, 3, 3, 2], 0, 6, 7, 6),  # only the last reaches 2: goal 2
        ([10, 9, 6, 3, 3, 3, 3, 3], 0, 6, 3, 6),  # goal 3: the lowest-KL point with 3
        ([0, 5, 9], 0, 6, 0, 1),  # the lowest-KL point meets the target: one generation
        ([7, 6, 4, 1, 0, 0, 0, 0, 0, 0, 0], 0, 6, 4, 6),
        ([7, 6, 4, 1, 0, 0, 0, 0, 0, 0, 0], 0, 3, 5, 3),  # budget 3: 0, 10, 5 confirmed; 5 is the lowest with 0
        ([4, 5, 6], 0, 6, 0, 2),  # the aggressive end is worse: keep the lowest KL
    ],
)
def test_confirmation_bisects_the_front(counts, target, budget, want, most):
    seen = []

    def count(k):
        seen.append(k)
        return counts[k]

    from surgery.abliteration.space import bisect_front

    assert bisect_front(len(counts), count, target, budget) == want
    assert len(seen) == len(set(seen)) and len(seen) <= most


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: S.abliterate(
                object(), ["a", "b"], ["c", "d"], eval_harmful=["e"], eval_harmless=["f"], whiten=-1.0
            ),
            "whiten must be a positive shrinkage (e.g. 30) or None, got -1.0",
        ),
        (
            lambda: R.refusal_directions(object(), ["a"], ["b"], whiten=True),
            "whiten must be a positive shrinkage (e.g. 30) or None, got True",
        ),
        (
            lambda: R.refusal_directions(object(), ["a"], ["b"], keep=["c"]),
            "keep= names the prompts to whiten against; it needs whiten= (e.g. whiten=30)",
        ),
        (
            lambda: S.abliterate(object(), ["a", "b"], ["c", "d"], eval_harmful=["e"], eval_harmless=["f"], refine=-1),
            "refine must be a number of steps >= 0 (0: off), got -1",
        ),
        (
            lambda: S.refine_direction(
                object(), S.Abliterate(torch.ones(4), attn_weights=[0]), ["a"], ["b"], steps=True
            ),
            "refine must be a number of steps >= 0 (0: off), got True",
        ),
        (
            lambda: S.refine_direction(object(), S.Orthogonalize(torch.ones(4)), ["a"], ["b"]),
            "refine_direction takes an Abliterate edit, got Orthogonalize",
        ),
        (
            lambda: S.refine_direction(object(), S.Abliterate(torch.ones(2, 4), attn_weights=[0]), ["a"], ["b"]),
            "refine_direction needs one direction: pass a vector, or a stack with direction_index",
        ),
        (
            lambda: S.refine_direction(
                object(), S.Abliterate(torch.ones(4), attn_weights=[0], embeddings=True), ["a"], ["b"]
            ),
            "refine_direction does not refine an edit of the embeddings (embeddings=True)",
        ),
        (
            lambda: S.refine_direction(
                object(), S.Abliterate(torch.ones(4), attn_weights=[0]), ["a"], ["b"], lr=float("nan")
            ),
            "lr must be a positive number, got nan",
        ),
        (
            lambda: S.refine_direction(object(), S.Abliterate(torch.ones(4), attn_weights=[0]), ["a"], ["b"], tokens=0),
            "tokens must be a positive integer, got 0",
        ),
    ],
)
def test_whiten_and_refine_are_checked_before_any_work(call, message):
    with pytest.raises(InputError) as err:
        call()  # object() is no model: any work would fail otherwise
    assert str(err.value) == message


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--whiten", "-1"], "--whiten must be a positive shrinkage (e.g. 30) or None, got -1.0"),
        (["--refine", "-3"], "--refine must be a number of steps >= 0 (0: off), got -3"),
        (["--trials", "0"], "--trials must be a positive integer, got 0"),
        (["--threads", "0"], "--threads must be a positive integer, got 0"),
        (["--sampler", "tpe"], "argument --sampler: invalid choice: 'tpe'"),
    ],
)
def test_cli_abliterate_bad_setting_exits_2_before_loading(flags, message, capsys, monkeypatch):
    """The flags are the config's settings: a bad value is the library's one-line check, spelled as a flag."""
    from _cli.app import main
    from _cli.context import Context

    monkeypatch.setattr(Context, "model", lambda self: pytest.fail("the model was loaded before the check"))
    code = main(["abliterate", "--harmful", "harmful:train", "--harmless", "harmless:train", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_abliterate_flags_are_generated_from_the_config():
    """One flag per command-line setting, with the setting's help and default; off / none read as None / 0."""
    import argparse

    from _cli.commands import abliterate as cmd
    from surgery.abliteration import AbliterationConfig, settings

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    flags = {a.dest: a for a in p._actions}
    for f in settings():
        assert (f.name in flags) == f.metadata["cli"], f.name
        if f.metadata["cli"]:
            assert (
                f.metadata["help"] in flags[f.name].help
                and "--" + f.name.replace("_", "-") in flags[f.name].option_strings
            )
    args = p.parse_args(
        ["--harmful", "h", "--harmless", "g", "--whiten", "off", "--refine", "off", "--system-prompt", "none"]
    )
    assert cmd.config(args) == AbliterationConfig(whiten=None, refine=0, system_prompt=None)
    assert cmd.config(p.parse_args(["--harmful", "h", "--harmless", "g"])) == AbliterationConfig()
    args = p.parse_args(
        ["--harmful", "h", "--harmless", "g", "--trials", "7", "--threads", "1", "--max-new-tokens", "9"]
    )
    assert cmd.config(args) == AbliterationConfig(trials=7, threads=1, max_new_tokens=9)


def test_config_checks_every_setting_and_names_the_closest():
    from surgery.abliteration import AbliterationConfig

    with pytest.raises(InputError, match=r"^abliterate has no setting 'trails'; did you mean 'trials'") as err:
        AbliterationConfig.build(trails=3)
    assert err.value.param == "trails"
    with pytest.raises(InputError, match=r"^max_confirm must be a positive integer, got 0$") as err:
        S.abliterate(object(), ["a", "b"], ["c", "d"], max_confirm=0)
    assert err.value.param == "max_confirm"
    cfg = AbliterationConfig(trials=3).replace(seed=2)
    assert (cfg.trials, cfg.seed) == (3, 2) and cfg.to_dict()["positions"] == [-1]
    assert AbliterationConfig.build({"trials": 5}, seed=1) == AbliterationConfig(trials=5, seed=1)


@pytest.mark.slow
def test_whitened_directions_equal_a_manual_ridge_solve(smol):
    harmful, harmless = R.load_prompts("harmful:train")[:6], R.load_prompts("harmless:train")[:6]
    keep = harmless + R.load_prompts("harmless:eval")[:6]
    dirs = R.refusal_directions(smol, harmful, harmless, whiten=30.0, keep=keep)
    assert dirs.whiten == 30.0 and dirs.to_dict()["whiten"] == 30.0
    a, b, k = (R.residuals(smol, p).double() for p in (harmful, harmless, keep))
    for layer in (5, 20):
        x = k[:, layer] - k[:, layer].mean(0)
        cov = x.T @ x / x.shape[0]
        r = torch.linalg.lstsq(
            cov + 30.0 * torch.trace(cov) / 576 * torch.eye(576, dtype=torch.float64),
            (a[:, layer].mean(0) - b[:, layer].mean(0))[:, None],
        ).solution[:, 0]
        h = b[:, layer].mean(0) / b[:, layer].mean(0).norm()
        r = r - (r @ h) * h
        assert torch.allclose(dirs.directions[layer].double(), r / r.norm(), atol=1e-5)
    # no keep: the harmless prompts' own covariance; a huge shrinkage: the plain difference of means
    plain = R.refusal_directions(smol, harmful, harmless)
    huge = R.refusal_directions(smol, harmful, harmless, whiten=1e9)
    assert torch.allclose(huge.directions, plain.directions, atol=1e-6)
    own = R.refusal_directions(smol, harmful, harmless, whiten=30.0)
    assert float((own.directions[20] @ dirs.directions[20]).abs()) < 0.999  # keep= changed it


def test_abliterate_refuses_an_unknown_contrast_before_any_work():
    with pytest.raises(InputError, match="contrast must be"):
        S.abliterate(object(), ["a", "b"], ["c", "d"], eval_harmful=["e"], eval_harmless=["f"], contrast="heretic")


@pytest.mark.slow
def test_behaviour_contrast_splits_by_what_the_model_refuses(smol):
    hf, hl = R.load_prompts("harmful:train")[:6], R.load_prompts("harmless:train")[:6]
    res = S.abliterate(
        smol,
        hf,
        hl,
        eval_harmful=R.load_prompts("harmful:eval")[:2],
        eval_harmless=R.load_prompts("harmless:eval")[:2],
        trials=2,
        max_new_tokens=4,
        sampler="sobol",
        contrast="behaviour",
        classify_tokens=8,
    )
    split = R.refusal_rate(smol, hf + hl, max_new_tokens=8)  # the classification, recomputed
    refused = [p for p, r in zip(split.prompts[:6], split.refused[:6]) if r]  # harmful prompts it refuses
    answered = [p for p, r in zip(split.prompts, split.refused) if not r]  # any prompt it answers
    declined = sum(split.refused[6:])  # harmless prompts it declines: in neither mean
    assert len(refused) >= 2 and len(answered) >= 2 and declined >= 1
    assert res.provenance["behaviour_split"] == {
        "refused": len(refused),
        "answered": len(answered),
        "declined_harmless": declined,
        "classify_tokens": 8,
    }
    assert res.provenance["contrast"] == "behaviour" and res.provenance["contrasts"] == ["behaviour"]
    # whitened (the default) against every answered or harmless training prompt
    from surgery.abliteration import WHITEN

    assert res.provenance["config"]["whiten"] == WHITEN
    want = R.refusal_directions(smol, refused, answered, whiten=WHITEN, keep=list(dict.fromkeys(answered + hl)))
    torch.testing.assert_close(res.directions.directions, want.directions, rtol=0, atol=1e-6)
    assert torch.equal(res.edit.direction, want.direction(res.trials[res.chosen]["params"]["direction_index"]))


@pytest.mark.slow
def test_behaviour_contrast_without_refusals_is_one_line(smol):
    # imperative requests: SmolLM2-135M answers them (docs/analyses.md), so there is no refused side
    asks = ["Write a haiku about rain.", "Write a short poem about the sea.", "List three colours."]
    split = R.refusal_rate(smol, asks + asks, max_new_tokens=8)
    assert split.count == 0  # the premise, checked with the scorer itself
    with pytest.raises(
        InputError,
        match=r"needs at least 2 refused harmful and 2 answered training prompts; "
        r"the model refused 0 of 3 harmful and answered 6 of 6",
    ):
        S.abliterate(
            smol,
            asks,
            asks,
            eval_harmful=asks[:1],
            eval_harmless=asks[:1],
            contrast="behaviour",
            classify_tokens=8,
            sampler="sobol",
            trials=1,
        )


def test_anchors_are_a_broad_and_an_attention_led_edit_per_contrast():
    from surgery.abliteration.space import anchors

    space = S.search_space(30)
    got = anchors(space, 30, ["sets", "behaviour"])
    assert [(a["contrast"], a["direction_index"]) for a in got] == [
        ("sets", 0.6 * 29),
        ("sets", 0.7 * 29),
        ("behaviour", 0.6 * 29),
        ("behaviour", 0.7 * 29),
    ]

    def weights(a, c):
        return S.peaked_weights(
            30, a[f"{c}.max_weight"], a[f"{c}.peak"], a[f"{c}.min_weight"] * a[f"{c}.max_weight"], a[f"{c}.width"]
        )

    for a in got:
        assert all(space[k][0] <= v <= space[k][1] for k, v in a.items() if k != "contrast")
    for broad in got[0::2]:  # weight 1 on every layer from peak − width (23.2 − 17.4) to the last
        assert weights(broad, "attn") == weights(broad, "mlp") == {i: 1.0 for i in range(6, 30)}
    for led in got[1::2]:
        attn, mlp = weights(led, "attn"), weights(led, "mlp")
        # attention: layers 23.2 ± 13.05 within the model (11..29), 1.5 at the peak, ≥ 0.95·1.5 everywhere
        assert sorted(attn) == list(range(11, 30))
        assert max(attn.values()) <= 1.5 and min(attn.values()) >= 0.95 * 1.5 - 1e-12
        # MLP: a band 19.43 ± 6.67 around the direction's layer (13..26), weights in [0.9, 1]
        assert sorted(mlp) == list(range(13, 27))
        assert all(0.9 - 1e-12 <= w <= 1.0 for w in mlp.values())
    assert "contrast" not in anchors(space, 30, ["sets"])[0]


@pytest.mark.parametrize("target, start_count, factor", [(0, 5, 1.25), (6, 5, 1 / 1.25)])
def test_search_ends_with_a_strength_line_search(target, start_count, factor):
    from surgery.abliteration.space import LINE_STEPS, propose

    space = S.search_space(30)
    gen = propose(24, space, 3, "sobol", ["sets"], 30, target)
    sent, params = [], next(gen)
    for i in range(24):
        sent.append(params)
        # the 6th trial has the fewest refusals (down to the target) and, among those, the least KL
        value = (start_count, 0.2) if i == 5 else (9.0 if i < 24 - LINE_STEPS else 4.0, 0.01 * i)
        try:
            params = gen.send(value)
        except StopIteration:
            break
    assert len(sent) == 24
    best = sent[5]
    for k, p in enumerate(sent[-LINE_STEPS:], 1):  # same shape, both max weights scaled by factor**k
        assert {n: v for n, v in p.items() if not n.endswith("max_weight")} == {
            n: v for n, v in best.items() if not n.endswith("max_weight")
        }
        for c in ("attn", "mlp"):
            assert p[f"{c}.max_weight"] == pytest.approx(best[f"{c}.max_weight"] * factor**k, rel=1e-12)
    assert sent[0]["direction_index"] == pytest.approx(0.6 * 29)  # anchors first


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_abliterate.py"
    spec = importlib.util.spec_from_file_location("bench_abliterate", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_matched_compares_each_side_at_the_others_fewest_refusals():
    heretic = [(9, 0.155), (2, 0.282), (4, 0.204), (2, 0.30), (25, 0.04)]
    ours_confirmed = [(23, 0.01), (6, 0.072), (2, 0.0945), (0, 0.166)]
    got = _bench().matched(heretic, 0, 0.166, ours_confirmed)
    # heretic never reaches 0; at heretic's fewest (2, its least KL there 0.282) ours has 0.0945 (and 0.166 at 0)
    assert got == {
        "refusals": 0,
        "ours_kl": 0.166,
        "heretic_kl": None,
        "at_heretic_best": {"refusals": 2, "heretic_kl": 0.282, "ours_kl": 0.0945},
    }
    got = _bench().matched(heretic, 4, 0.09, [(4, 0.09), (9, 0.05)])
    assert got["heretic_kl"] == 0.204 and got["at_heretic_best"]["ours_kl"] is None


# --------------------------------------------------------------------------- refine_direction
def test_project_rows_gradient_matches_finite_differences():
    from surgery.edits.abliteration import project_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    r = torch.randn(6, generator=g, dtype=torch.float64)
    for norm_preserve in (False, True):
        f = lambda v, keep=norm_preserve: project_rows(x, v / v.norm(), 0.8, keep)  # noqa: E731
        assert torch.autograd.gradcheck(f, (r.clone().requires_grad_(),))
    # the edit bakes the same function: plain W - w r rᵀ W, rows' norms kept with norm_preserve
    u = r / r.norm()
    torch.testing.assert_close(project_rows(x, u, 0.8, False), x - 0.8 * torch.outer(u, u @ x), rtol=0, atol=1e-12)
    torch.testing.assert_close(project_rows(x, u, 0.8, True).norm(dim=1), x.norm(dim=1), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_refine_direction_starts_at_the_edit_and_lowers_the_harmless_kl(smol):
    hf, keep = R.load_prompts("harmful:train")[:4], R.load_prompts("harmless:train")[:4]
    dirs = R.refusal_directions(smol, hf, keep)
    edit = S.Abliterate.peaked(
        dirs.directions,
        smol.n_layers,
        direction_index=20.3,
        attn=(2.0, 23.2, 1.9, 13.05),
        mlp=(1.3, 19.4, 1.2, 6.7),
        norm_preserve=True,
    )
    torch.testing.assert_close(
        S.refine_direction(smol, edit, hf, keep, steps=0).direction, edit.unit().float(), rtol=0, atol=1e-7
    )
    with torch.no_grad():  # as under a TransformerLens-style torch.set_grad_enabled(False)
        ref = S.refine_direction(smol, edit, hf, keep, steps=4, tokens=6)
    # step 0 is the edit itself: the differentiable hooks reproduce the baked weights' KL and the teacher
    start_kl = R.prompt_kl(smol, keep, fwd_hooks=edit.as_hooks(smol)).mean
    assert ref.history[0]["keep_kl"] == pytest.approx(start_kl, rel=1e-3)
    assert ref.history[0]["harmful_kl"] < 1e-6 and ref.history[0]["cosine"] == pytest.approx(1.0)
    # the refined edit, baked into the weights, moves the harmless prompts less than the edit it came from
    end_kl = R.prompt_kl(smol, keep, fwd_hooks=ref.edit.as_hooks(smol)).mean
    assert end_kl < 0.8 * start_kl and 0.9 < ref.cosine < 1.0
    assert ref.edit.attn_weights == edit.attn_weights and ref.edit.mlp_weights == edit.mlp_weights
    assert torch.equal(ref.edit.direction, ref.direction)


@pytest.mark.slow
def test_search_scores_the_refined_direction_and_replays_it(smol, tmp_path):
    harmful, harmless = R.load_prompts("harmful:train")[:4], R.load_prompts("harmless:train")[:4]
    stages, updates, threads = [], [], torch.get_num_threads()

    def record(stage, total):
        stages.append((stage, total))
        return lambda advance=1, status=None: updates.append((stage, advance, status))

    eval_harmless = R.load_prompts("harmless:eval")[:3]
    res = S.abliterate(
        smol,
        harmful,
        harmless,
        eval_harmful=R.load_prompts("harmful:eval")[:2],
        eval_harmless=eval_harmless,
        trials=4,
        max_new_tokens=4,
        sampler="sobol",
        refine=2,
        contrast="sets",
        threads=1,
        progress=record,
    )
    # one progress line per stage, in order; the trials' line counts trials and shows the best so far;
    # every line also moves while the model runs (ticks between the counted steps)
    assert [stage for stage, _ in stages] == ["setup", "trials", "refinement", "confirmation"]
    assert dict(stages)["trials"] == 3 and dict(stages)["refinement"] == 2 + 1
    counted = [(st, n, status) for st, n, status in updates if n]
    assert (
        sum(n for st, n, _ in counted if st == "trials") == 3
        and sum(n for st, n, _ in counted if st == "refinement") == 3
    )
    assert any(status and status.startswith("best ") for st, _, status in counted if st == "trials")
    assert any(n == 0 for st, n, _ in updates if st == "trials") and torch.get_num_threads() == threads
    assert res.provenance["config"]["threads"] == 1 and res.provenance["sampler"] == "sobol"
    from surgery.abliteration.space import refine_trials

    assert refine_trials(4) == 1 and [bool(t["params"].get("refined")) for t in res.trials] == [False] * 3 + [True]
    info = res.provenance["refine"]
    assert info["steps"] == 2 and info["trials"] == 1 and info["teacher_trial"] in range(3)
    # the refined trial is the teacher's profile with the direction refine_direction gives on its own
    teacher = res.trials[info["teacher_trial"]]["params"]
    from surgery.abliteration.space import edit_for

    want = S.refine_direction(smol, edit_for(res.directions, teacher, smol.n_layers), harmful, harmless, steps=2)
    refined_edit = edit_for(res.directions, res.trials[3]["params"], smol.n_layers, refined=want.direction)
    assert info["cosine"] == pytest.approx(want.cosine, abs=1e-4)
    kl = R.prompt_kl(smol, eval_harmless, fwd_hooks=refined_edit.as_hooks(smol))
    assert kl.mean == pytest.approx(res.trials[3]["kl"], rel=1e-3, abs=1e-6)
    assert list(res.figure().data[0].marker.symbol) == ["circle"] * 3 + ["diamond"]
    if res.trials[res.chosen]["params"].get("refined"):  # the plan carries the refined vector and replays it
        assert torch.equal(res.edit.direction, want.direction)


@pytest.mark.slow
def test_refine_direction_carries_the_edits_biases(smol):
    # a tiny random model with o_proj / down_proj biases, reading SmolLM2's tokenizer and chat template
    from hooks import HookedLlama
    from tests.helpers import tiny_hf

    model = HookedLlama.from_hf(
        tiny_hf("bias", vocab_size=smol.cfg.d_vocab, max_position_embeddings=256), tokenizer=smol.tokenizer
    )
    hf, keep = R.load_prompts("harmful:train")[:3], R.load_prompts("harmless:train")[:3]
    r = torch.randn(model.d_model, generator=torch.Generator().manual_seed(1))
    edit = S.Abliterate(r, attn_weights={0: 1.0, 2: 0.7}, mlp_weights={1: 1.3}, norm_preserve=True)
    assert model.blocks[0].attn.o_proj.bias is not None and model.blocks[1].mlp.down_proj.bias is not None
    ref = S.refine_direction(model, edit, hf, keep, steps=2, tokens=4)
    assert all(p.grad is None for p in model.parameters())  # only the direction was differentiated
    # step 0: the hooks rebuild the baked edit, biases included (its answers' KL to the baked teacher is 0)
    assert ref.history[0]["harmful_kl"] < 1e-9
    assert ref.history[0]["keep_kl"] == pytest.approx(
        R.prompt_kl(model, keep, fwd_hooks=edit.as_hooks(model)).mean, rel=1e-4
    )


def test_without_optuna_the_search_says_what_it_uses_instead(monkeypatch):
    """One line, at the start of the search: the sampler it falls back to and how to get TPE."""
    import sys

    from surgery.abliteration import SearchNotice
    from surgery.abliteration.search import resolve_sampler

    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna -> ImportError
    with pytest.warns(SearchNotice) as caught:
        assert resolve_sampler("auto") == "sobol"
    (notice,) = caught
    text = str(notice.message)
    assert "\n" not in text and "optuna is not installed" in text and "Sobol" in text and "[abliterate]" in text
    assert resolve_sampler("sobol") == "sobol"
    with pytest.raises(InputError, match=r"sampler='optuna' needs Optuna") as err:
        resolve_sampler("optuna")
    assert err.value.param == "sampler"


def test_cli_prints_the_notice_on_one_line(capsys):
    from _cli.commands.abliterate import _one_line
    from surgery.abliteration import SearchNotice

    _one_line(SearchNotice("optuna is not installed: …"), SearchNotice, "f.py", 1)
    assert capsys.readouterr().err == "note: optuna is not installed: …\n"
