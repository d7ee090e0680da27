"""How strong a steering push keeps text coherent on the default model (``steer(strength=…)``).

A joyful-minus-gloomy direction (notebook 03's prompt sets) is read at ``resid_post`` of several layers;
eight neutral requests are answered greedily (24 new tokens) with ``strength`` × the residual norm added
at that layer, both signs. Per setting:

- ``nll``: the unsteered model's mean next-token loss on the steered answer (coherence: the unsteered
  answers score about 0.5; word salad scores 5 and more);
- ``distinct``: distinct tokens / tokens of the answer (falls when the text loops);
- ``mood``: joyful minus gloomy words of a small lexicon per answer (mean), at +strength and −strength;
- ``changed``: answers that differ from the unsteered ones.

``python benchmarks/bench_steering.py [--layers 5,10,15,20] [--strengths 0.05,0.1,...]`` prints a table and
the first answer of every setting (about 25 minutes on the quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses import steer, steering_direction  # noqa: E402
from hooks import HookedLlama  # noqa: E402

TOPICS = ["the ocean", "my new job", "the weekend", "winter", "our neighbours", "the city", "school", "the weather"]
NEUTRAL = ["the park", "a train ride", "my kitchen", "the library", "a Monday", "the river", "a bicycle", "dinner"]
JOY = {
    "joy", "joyful", "happy", "happiness", "wonderful", "love", "lovely", "bright", "beautiful", "delight",
    "delightful", "great", "amazing", "excited", "exciting", "smile", "smiles", "fun", "cheerful", "laughter",
    "sunshine", "warm", "glow", "vibrant", "thrilled", "fantastic",
}  # fmt: skip
GLOOM = {
    "sad", "sadness", "gloomy", "gloom", "dark", "darkness", "grey", "gray", "lonely", "loneliness", "tears",
    "cold", "empty", "sorrow", "melancholy", "heavy", "bleak", "dreary", "despair", "grief", "silent", "shadows",
    "misery", "rain", "lost",
}  # fmt: skip


def answers(model, prompts, hooks=(), max_new_tokens=24):
    tokens, mask = model.tokenize(prompts)
    with model.hooks(fwd_hooks=list(hooks)), torch.no_grad():
        out = model.generate(tokens, max_new_tokens, attention_mask=mask, return_type="tokens")
    return tokens, mask, out[:, tokens.shape[1] :]


def nll_of(model, tokens, mask, new):
    """The unsteered model's mean next-token loss on ``new`` (per answer, up to its end of sequence)."""
    eos = model.config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos])
    hit = torch.isin(new, eos).long()
    keep = (hit.cumsum(1) - hit) == 0
    full = torch.cat([tokens, new], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=torch.cat([mask, keep.long()], 1))
    lp = logits[:, tokens.shape[1] - 1 : -1].double().log_softmax(-1)
    nll = -lp.gather(-1, new[..., None])[..., 0]
    return ((nll * keep).sum(1) / keep.sum(1).clamp_min(1)).tolist(), keep


def mood(text: str) -> int:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in JOY for w in words) - sum(w in GLOOM for w in words)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="5,10,15,20")
    ap.add_argument("--strengths", default="0.05,0.1,0.15,0.25,0.5,1")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = HookedLlama.default()
    joyful = [
        [{"role": "user", "content": f"Write one sentence about {t}. Make it joyful and enthusiastic."}] for t in TOPICS
    ]
    gloomy = [[{"role": "user", "content": f"Write one sentence about {t}. Make it sad and gloomy."}] for t in TOPICS]
    neutral = [[{"role": "user", "content": f"Write one sentence about {t}."}] for t in NEUTRAL]
    tokens, mask, base_new = answers(model, neutral)
    base_nll, _ = nll_of(model, tokens, mask, base_new)
    dec = lambda new: [model.tokenizer.decode(r, skip_special_tokens=True) for r in new]  # noqa: E731
    base_text = dec(base_new)
    print(f"unsteered: nll {sum(base_nll) / len(base_nll):.2f}, mood {sum(map(mood, base_text)) / len(base_text):+.2f}")
    print(f"{'layer':>5} {'‖resid‖':>8} {'‖Δmean‖':>8} {'strength':>8} {'nll+':>6} {'nll−':>6} {'distinct':>8} "
          f"{'mood+':>6} {'mood−':>6} {'changed':>7}")  # fmt: skip
    samples = []
    for layer in [int(x) for x in args.layers.split(",")]:
        d = steering_direction(model, joyful, gloomy, layer=layer)
        for s in [float(x) for x in args.strengths.split(",")]:
            row = {}
            for sign in (1, -1):
                _, _, new = answers(model, neutral, steer(model, d, strength=sign * s).fwd_hooks)
                nll, keep = nll_of(model, tokens, mask, new)
                text = dec(new)
                distinct = [len(set(r[k].tolist())) / max(int(k.sum()), 1) for r, k in zip(new, keep)]
                row[sign] = (sum(nll) / len(nll), sum(distinct) / len(distinct), sum(map(mood, text)) / len(text))
                row[f"changed{sign}"] = sum(a != b for a, b in zip(text, base_text))
                if sign == 1:
                    samples.append((layer, s, text[0]))
            print(
                f"{layer:>5} {d.resid_norm:>8.1f} {d.norm:>8.1f} {s:>8.2f} {row[1][0]:>6.2f} {row[-1][0]:>6.2f} "
                f"{(row[1][1] + row[-1][1]) / 2:>8.2f} {row[1][2]:>+6.2f} {row[-1][2]:>+6.2f} "
                f"{row['changed1'] + row['changed-1']:>4}/{2 * len(neutral)}"
            )
    print("\nfirst answer (+strength):")
    print(f"  unsteered: {base_text[0]!r}")
    for layer, s, text in samples:
        print(f"  layer {layer} strength {s}: {text!r}")


if __name__ == "__main__":
    main()
