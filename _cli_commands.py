"""The ``scalpel`` commands that inspect, edit and measure: info, generate, ablate, sweep, edit, verify.

Each ``cmd_*(args, ctx)`` takes the parsed arguments and a ``cli.Context`` (which loads the model
once) and returns an ``Output`` (JSON data, tables, figures); ``cli.main`` prints it and writes the
report. Nothing here prints.

Example::

    from cli import Context, build_parser
    args = build_parser().parse_args(["info"])
    out = cmd_info(args, Context("path/to/checkpoint"))
    out.data["parameters"]
"""

from __future__ import annotations

import csv
import io
import textwrap
from itertools import zip_longest

import torch

from _cli_ablate import Scorer, build_plan, evaluate, sweep
from _cli_inputs import (CLIError, check_heads, check_layers, check_neurons, gather_prompts, load_vector,
                         parse_heads, parse_layers, parse_neurons, parse_steer)
from _cli_report import Output, write_atomic


def _meta(model) -> dict:
    from cli import model_meta

    return model_meta(model)


# --------------------------------------------------------------------------- info
PROBE_POSITIONS = 4


@torch.no_grad()
def hook_shapes(model, positions: int = PROBE_POSITIONS) -> dict[str, list[int]]:
    """Shape of every hook point (``attn.hook_result`` included) for one prompt of ``positions`` tokens."""
    tokens = (torch.arange(positions) % model.d_vocab)[None].to(model.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: True)
    return {name: list(cache[name].shape) for name in model.hook_names()}


def _hook_kind(name: str) -> str:
    parts = name.split(".")
    return "blocks.{i}." + ".".join(parts[2:]) if parts[0] == "blocks" else name


def cmd_info(args, ctx) -> Output:
    """Architecture, parameter count, dtype/device and the hook map (names x shapes)."""
    model = ctx.model()
    c = model.config
    from hooks import config as hooks_config

    rope = hooks_config.rope_parameters(c)
    attn = [layer.self_attn for layer in model.model.layers]
    windows = [a.sliding_window for a in attn]
    arch = {"architecture": hooks_config.family_class_name(c), "n_layers": model.n_layers, "d_model": model.d_model,
            "n_heads": model.n_heads, "n_kv_heads": model.n_kv_heads, "d_head": model.d_head, "d_mlp": model.d_mlp,
            "d_vocab": model.d_vocab, "max_positions": c.max_position_embeddings, "activation": c.hidden_act,
            "rms_norm_eps": c.rms_norm_eps, "rope_type": rope.get("rope_type", "default"),
            "rope_theta": rope.get("rope_theta"), "tied_embeddings": model.lm_head.weight is model.model.embed_tokens.weight,
            "attention_bias": any(getattr(a, n).bias is not None for a in attn for n in hooks_config.ATTENTION_PROJECTIONS),
            "mlp_bias": any(getattr(layer.mlp, n).bias is not None for layer in model.model.layers
                            for n in hooks_config.MLP_PROJECTIONS),
            "sliding_window": windows if any(w is not None for w in windows) else None,  # keys per query, per layer
            "qk_norm": hooks_config.qk_norm(c)}
    n_params = sum(p.numel() for p in model.parameters())
    shapes = hook_shapes(model)
    data = {"command": "info", "model": _meta(model), "config": arch, "parameters": n_params,
            "dtype": str(model.dtype).replace("torch.", ""), "device": str(model.device),
            "tokenizer": type(model.tokenizer).__name__ if model.tokenizer is not None else None,
            "hook_probe": {"batch": 1, "positions": PROBE_POSITIONS},
            "hooks": [{"name": n, "shape": s} for n, s in shapes.items()]}
    out = Output("info", data)
    facts = [["source", model.source or "in memory"], ["parameters", f"{n_params:,}"],
             ["dtype / device", f"{data['dtype']} / {data['device']}"], ["tokenizer", data["tokenizer"] or "none"]]
    facts += [[k, v] for k, v in arch.items()]
    out.table("model", ["", "value"], facts, max_width=0)
    if args.all_hooks:
        out.table(f"hook points ({len(shapes)}; shapes for batch=1, pos={PROBE_POSITIONS})", ["hook point", "shape"],
                  [[n, str(s)] for n, s in shapes.items()])
    else:
        kinds: dict[str, list] = {}
        for name, shape in shapes.items():
            kinds.setdefault(_hook_kind(name), []).append(shape)
        rows = [[k, len(v), str(v[0]) if all(s == v[0] for s in v) else "varies"] for k, v in kinds.items()]
        out.table(f"hook map ({len(shapes)} hook points; shapes for batch=1, pos={PROBE_POSITIONS})",
                  ["hook point", "count", "shape"], rows, note="--all-hooks lists every name")
    return out


# --------------------------------------------------------------------------- generate
def _plan_from(args, model):
    """The edit plan of ``--edits`` plus one ``AddSteering`` per ``--steer``; validated on ``model``."""
    import surgery

    plan = surgery.load_plan(args.edits) if args.edits else surgery.EditPlan()
    for spec in args.steer or []:
        steer = parse_steer(spec)
        check_layers(model, [steer.layer], "--steer", spec)
        vector = load_vector(steer.path)
        if vector.shape[0] != model.d_model:
            raise CLIError(f"--steer {spec}: the vector has {vector.shape[0]} entries, the model's d_model is "
                           f"{model.d_model}")
        try:
            plan.append(surgery.AddSteering(steer.layer, vector, steer.scale))
        except surgery.EditError as exc:  # NaN/inf in the vector: name the flag and file
            raise CLIError(f"--steer {spec}: {exc}") from None
    plan.validate(model)
    return plan


def _complete(model, args) -> tuple[str, list[int]]:
    """(completion text, new token ids) of the prompt."""
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    tokens, mask = model.tokenize(prompt)
    out = model.generate(tokens.to(model.device), args.max_new_tokens, attention_mask=mask.to(model.device),
                         do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                         return_type="tokens")
    new = out[0, tokens.shape[1]:].tolist()
    return model.tokenizer.decode(new, skip_special_tokens=True), new


def cmd_generate(args, ctx) -> Output:
    """Complete a prompt; with ``--edits``/``--steer`` the edited model, with ``--compare`` both."""
    if args.compare and not (args.edits or args.steer):
        raise CLIError("--compare needs --edits PLAN or --steer LAYER:VECTOR:SCALE (something to compare with)")
    model = ctx.model()
    if model.tokenizer is None:
        raise CLIError("this model has no tokenizer; generate needs one (load a checkpoint with tokenizer files)")
    plan = _plan_from(args, model)
    data = {"command": "generate", "model": _meta(model), "prompt": args.prompt, "chat": args.chat,
            "max_new_tokens": args.max_new_tokens, "sampling": {"sample": args.sample, "seed": args.seed,
                                                                "temperature": args.temperature, "top_p": args.top_p}}
    out = Output("generate", data)
    base, base_ids = _complete(model, args) if (args.compare or not len(plan)) else (None, None)
    edited = edited_ids = None
    if len(plan):
        with plan.applied(model):
            edited, edited_ids = _complete(model, args)
        data["edits"] = plan.to_dict()
    data.update(base=base, edited=edited, base_tokens=base_ids, edited_tokens=edited_ids)
    if base is not None and edited is not None:
        left, right = textwrap.wrap(base, 48) or [""], textwrap.wrap(edited, 48) or [""]
        out.table(f"prompt: {args.prompt}", ["base", "edited"], [[a or "", b or ""] for a, b in zip_longest(left, right)])
    else:
        out.text("", args.prompt + (base if base is not None else edited))
    return out


# --------------------------------------------------------------------------- ablate
def _units(args, model) -> tuple[list, list, list]:
    heads = parse_heads(args.heads) if args.heads else []
    neurons = parse_neurons(args.neurons) if args.neurons else []
    layers = parse_layers(args.layers) if args.layers else []
    if model is not None:
        check_heads(model, heads)
        check_neurons(model, neurons)
        check_layers(model, layers)
    return heads, neurons, layers


def _answers(args) -> list[str] | None:
    if args.answers and len(args.answers) > 2:
        raise CLIError(f"--answers takes CORRECT [INCORRECT], got {len(args.answers)} values")
    return args.answers


def _trim(text: str, n: int = 40) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= n else "…" + text[-(n - 1):]


def cmd_ablate(args, ctx) -> Output:
    """Base vs edited metric on the prompts (per prompt and mean); ``--out`` exports the edited model."""
    if not (args.heads or args.neurons or args.layers):
        raise CLIError("ablate needs something to ablate: --heads L.H,... and/or --neurons L:N,... and/or --layers L,...")
    _units(args, None)  # syntax first, before loading anything
    items = gather_prompts(args.prompt, args.prompts, _answers(args))
    if not items:
        raise CLIError("ablate needs prompts: --prompts FILE or --prompt TEXT")
    model = ctx.model()
    heads, neurons, layers = _units(args, model)
    scorer = Scorer.build(model, args.metric, items)
    plan = build_plan(model, heads, neurons, layers, mean=args.mean, texts=scorer.texts)
    plan.validate(model)
    base = evaluate(model, scorer, args.batch_size, desc="base")
    with plan.applied(model):
        edited = evaluate(model, scorer, args.batch_size, desc="edited")
    rows = []
    for i, item in enumerate(items):
        row = {"prompt": item.text, "correct": item.correct, "incorrect": item.incorrect,
               "base": float(base["values"][i]), "edited": float(edited["values"][i]),
               "effect": float(edited["values"][i] - base["values"][i])}
        for key in ("correct_logit", "incorrect_logit"):
            if key in base:
                row[f"base_{key}"], row[f"edited_{key}"] = float(base[key][i]), float(edited[key][i])
        rows.append(row)
    mean = {k: float(torch.tensor([r[k] for r in rows], dtype=torch.float64).mean()) for k in ("base", "edited", "effect")}
    spec = {"heads": [f"{l}.{h}" for l, h in heads], "neurons": [f"{l}:{n}" for l, n in neurons], "layers": layers,
            "ablation": "mean" if args.mean else "zero"}
    data = {"command": "ablate", "model": _meta(model), "metric": args.metric, "units": spec, "edits": plan.to_dict(),
            "prompts": rows, "mean": mean}
    out = Output("ablate", data, title="scalpel ablate")
    if args.out:
        import surgery

        res = surgery.export(model, args.out, edits=plan, overwrite=args.overwrite)
        data["export"] = {"out_dir": str(res.out_dir), "files": res.files, "max_abs_logit_diff": res.max_abs_logit_diff,
                          "tolerance": res.tolerance, "kl_to_base": res.kl_to_base}
        out.files.append(str(res.out_dir))
    answers = args.metric != "loss"
    headers = ["#", "prompt"] + (["answers"] if answers else []) + ["base", "edited", "effect"]
    table = [[i, _trim(r["prompt"])] + ([f"{r['correct']!r}" + (f" vs {r['incorrect']!r}" if r["incorrect"] else "")]
                                         if answers else []) + [r["base"], r["edited"], r["effect"]]
             for i, r in enumerate(rows)]
    table.append(["", "mean"] + ([""] if answers else []) + [mean["base"], mean["edited"], mean["effect"]])
    what = " + ".join(x for x in (_plural(len(heads), "head"), _plural(len(neurons), "neuron"),
                                  _plural(len(layers), "layer")) if x)
    out.table(f"{'mean-' if args.mean else ''}ablating {what}: {args.metric} per prompt (effect = edited - base)",
              headers, table)
    if args.out:
        e = data["export"]
        out.table("export", ["", "value"], [["directory", e["out_dir"]], ["files", len(e["files"])],
                                           ["reload max |logit diff|", e["max_abs_logit_diff"]],
                                           ["tolerance", e["tolerance"]], ["KL to base (probes)", e["kl_to_base"]]])
    out.figure(f"{args.metric} per prompt, base vs edited", _bars(rows, mean, args.metric))
    return out


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}{'s' if n != 1 else ''}"


def _bars(rows: list[dict], mean: dict, metric: str):
    """Grouped bars, base vs edited, per prompt (hover shows the prompt) and their mean."""
    import plotly.graph_objects as go

    labels = [f"#{i}" for i in range(len(rows))] + ["mean"]
    hover = [r["prompt"] for r in rows] + ["mean over prompts"]
    fig = go.Figure([go.Bar(name=name, x=labels, y=[r[key] for r in rows] + [mean[key]], hovertext=hover,
                            hovertemplate="%{hovertext}<br>" + name + " %{y:.4g}<extra></extra>")
                     for name, key in (("base", "base"), ("edited", "edited"))])
    fig.update_layout(barmode="group", yaxis_title=metric, xaxis_title="prompt", xaxis_type="category",
                      margin=dict(l=60, r=20, t=40, b=60), legend=dict(orientation="h", y=1.1))
    return fig


# --------------------------------------------------------------------------- sweep
def cmd_sweep(args, ctx) -> Output:
    """Ablate every unit of a component alone, rank by |mean effect|, table + figure (+ CSV)."""
    layers = parse_layers(args.layers) if args.layers else None
    if args.component == "neurons" and layers is None:
        raise CLIError("sweep --component neurons needs --layers (every neuron of every layer is a long sweep)")
    if args.mean and args.component != "heads":
        raise CLIError("--mean applies to --component heads only")
    items = gather_prompts(args.prompt, args.prompts, _answers(args))
    if not items:
        raise CLIError("sweep needs prompts: --prompts FILE or --prompt TEXT")
    model = ctx.model()
    if layers is not None:
        check_layers(model, layers)
    scorer = Scorer.build(model, args.metric, items)
    res = sweep(model, scorer, args.component, layers, batch_size=args.batch_size, mean=args.mean)
    order = res.ranking()
    mean_eff = res.effects.double().mean(-1)
    base_mean = float(res.base.double().mean())
    ranked = [{"rank": r + 1, "unit": res.label(res.units[u]), "layer": res.units[u][0], "index": res.units[u][1],
               "mean_effect": float(mean_eff[u]), "mean_ablated": base_mean + float(mean_eff[u]),
               "effects": [float(x) for x in res.effects[u]]} for r, u in enumerate(order)]
    data = {"command": "sweep", "model": _meta(model), "component": args.component, "metric": args.metric,
            "ablation": res.ablation, "prompts": [it.text for it in items], "base": [float(x) for x in res.base],
            "base_mean": base_mean, "units": ranked}
    out = Output("sweep", data, title=f"scalpel sweep --component {args.component}")
    label = {"heads": "head (L.H)", "neurons": "neuron (L:N)", "layers": "layer"}[args.component]
    out.table(f"{len(ranked)} {args.component} ranked by |mean effect| on {args.metric} "
              f"(base mean {base_mean:.4g}; {res.ablation} ablation, {len(items)} prompts)",
              ["rank", label, "mean effect", f"mean {args.metric} ablated"],
              [[r["rank"], r["unit"], r["mean_effect"], r["mean_ablated"]] for r in ranked[:args.top]])
    if args.csv:
        write_atomic(args.csv, _csv(ranked, len(items)))
        out.files.append(args.csv)
    out.figure(f"top {min(30, len(ranked))} {args.component} by |mean effect|", _rank_bars(ranked[:30], args.metric))
    if args.component == "heads":
        from analyses.plotting import heatmap

        ls = sorted({u[0] for u in res.units})
        z = torch.full((len(ls), model.n_heads), float("nan"))
        for u, (layer, head) in enumerate(res.units):
            z[ls.index(layer), head] = mean_eff[u]
        out.figure("mean effect of ablating each head", heatmap(
            z, [f"H{h}" for h in range(model.n_heads)], [f"L{l}" for l in ls], title=f"effect on {args.metric}",
            x_title="head", y_title="layer", colorbar_title="effect"))
    return out


def _csv(ranked: list[dict], n_prompts: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "unit", "layer", "index", "mean_effect", "mean_ablated"] + [f"effect_{i}" for i in range(n_prompts)])
    for r in ranked:
        w.writerow([r["rank"], r["unit"], r["layer"], "" if r["index"] is None else r["index"],
                    repr(r["mean_effect"]), repr(r["mean_ablated"])] + [repr(x) for x in r["effects"]])
    return buf.getvalue()


def _rank_bars(ranked: list[dict], metric: str):
    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[r["unit"] for r in ranked], y=[r["mean_effect"] for r in ranked],
                           marker_color=["#c0392b" if r["mean_effect"] < 0 else "#2471a3" for r in ranked]))
    fig.update_layout(xaxis_title="unit", yaxis_title=f"mean effect on {metric}", xaxis_type="category",
                      margin=dict(l=60, r=20, t=40, b=80))
    return fig


# --------------------------------------------------------------------------- edit / verify
def cmd_edit(args, ctx) -> Output:
    """Apply an edit plan and export a verified checkpoint (HF directory, or a GGUF file)."""
    import surgery

    plan = surgery.load_plan(args.plan)
    if not len(plan):
        raise CLIError(f"{args.plan} holds no edits")
    model = ctx.model()
    plan.validate(model)
    data = {"command": "edit", "model": _meta(model), "edits": plan.to_dict(), "format": args.format}
    out = Output("edit", data)
    if args.format == "gguf":
        res = surgery.export_gguf(model, args.out, edits=plan, dtype=args.gguf_dtype, overwrite=args.overwrite)
        data["export"] = {"path": str(res.path), "dtype": res.dtype, "sha256": res.sha256,
                          "max_abs_logit_diff": res.max_abs_logit_diff,
                          "max_abs_logit_diff_unrounded": res.max_abs_logit_diff_unrounded, "tolerance": res.tolerance}
        rows = [["file", str(res.path)], ["dtype", res.dtype], ["sha256", res.sha256],
                ["reload max |logit diff|", res.max_abs_logit_diff], ["tolerance", res.tolerance]]
        out.files.append(str(res.path))
    else:
        res = surgery.export(model, args.out, edits=plan, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
        data["export"] = {"out_dir": str(res.out_dir), "files": res.files, "max_abs_logit_diff": res.max_abs_logit_diff,
                          "tolerance": res.tolerance, "kl_to_base": res.kl_to_base}
        rows = [["directory", str(res.out_dir)], ["files", len(res.files)],
                ["reload max |logit diff|", res.max_abs_logit_diff], ["tolerance", res.tolerance],
                ["KL to base (probes)", res.kl_to_base]]
        out.files.append(str(res.out_dir))
    out.table(f"applied {len(plan)} edit(s): " + ", ".join(e.kind for e in plan), ["", "value"], rows)
    return out


def cmd_verify(args, ctx) -> Output:
    """Re-check an exported checkpoint: sha256 of every file, then reload parity with transformers."""
    import surgery

    res = surgery.verify(args.dir, reload=not args.no_reload)
    data = {"command": "verify", **{k: v for k, v in res.items()}}
    out = Output("verify", data)
    rows = [["directory", res.get("out_dir", args.dir)], ["ok", bool(res.get("ok"))],
            ["files checked (sha256)", res.get("files_checked")]]
    if res.get("unlisted_files"):
        rows.append(["files not in the manifest", ", ".join(res["unlisted_files"])])
    if "max_abs_logit_diff" in res:
        rows += [["reload max |logit diff|", res["max_abs_logit_diff"]], ["tolerance", res["tolerance"]],
                 ["top-5 tokens match", bool(res.get("top5_match"))]]
    out.table("verified", ["", "value"], rows)
    return out


# analyses-backed commands live in _cli_analyses.py
from _cli_analyses import cmd_heads, cmd_lens, cmd_patch  # noqa: E402,F401
