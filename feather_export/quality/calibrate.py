"""``feather-export calibrate``: per-layer image-token similarity and a suggested BTP schedule.

For every calibration item (``--data FILE.jsonl``: the user's images and questions; or
``--synthetic N``: N items of the shapes task's ``val`` split) the unpruned model runs the prompt
through transformers' own decoder layers in fp32; for each layer l the similarity is the mean, over
the image tokens, of the cosine similarity between the hidden state entering layer l and the one
leaving it (= entering layer l + 1). The per-layer value is the mean over items.

**Suggested schedule (deterministic rule).** Let c_l = max(0, 1 - s_l) be how much layer l changes
the image tokens and C(k) = (c_0 + ... + c_{k-1}) / (c_0 + ... + c_{L-1}) the share of the total
change made before layer k (C(k) = k / L when every layer changes them equally). The number of
stages is S = min(4, L - 1). Stage s targets the fraction q_s of BTP's LLaVA-1.5-7B reference depth
({3, 6, 14, 22} / 32; with S < 4: the first S - 1 of them and 22/32 for the last); its layer K_s is
the smallest k >= 1 with C(k) >= q_s, raised to K_{s-1} + 1 and lowered to L - 1 - (S - s) so
that every stage fits. The counts are BTP's default ones (round(N/2), round(N/4), round(N/12),
then 0; with S < 4 the first S - 1 of them, then 0). So the prune points sit at the same shares of
*representation change* as the reference's sit in depth: a model whose early layers change its
image tokens most gets earlier stages. The result is a ``--schedule`` string taken as is.
"""
from __future__ import annotations

import json
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from feather_export.errors import FeatherError

RULE = ("K_s = smallest k >= 1 with cumulative image-token change C(k) >= q_s, q = {3,6,14,22}/32 "
        "(BTP's LLaVA-1.5-7B stage depths; S = min(4, L-1) stages, with S < 4 the first S-1 and "
        "22/32), raised above the previous stage and capped so every stage fits in 1..L-1; counts "
        "round(N/2), round(N/4), round(N/12) (first S-1), then 0; change c_l = max(0, 1 - s_l)")


@dataclass(frozen=True)
class CalibrateOptions:
    model: str = "tiny-shapes"
    data: str | None = None           # a .jsonl file (image, question[, answers])
    synthetic: int | None = None      # N items of the shapes task (val split)
    seed: int = 0                     # shapes-task seed
    out: str | None = None
    threads: int = 1                  # torch intra-op threads (0: torch's default)


@dataclass(frozen=True)
class CalibItem:
    question: str
    image_fn: Callable

    def image(self):
        return self.image_fn()


def suggest_schedule(similarity: Sequence[float], num_image_tokens: int) -> str:
    """The documented rule (module docstring) as a ``LAYER:COUNT,...`` string."""
    from feather_export.methods.config import (BTP_REFERENCE_LAYERS, BTP_REFERENCE_NUM_LAYERS,
                                               btp_fitting_counts)

    num_layers = len(similarity)
    if num_layers < 2:
        raise FeatherError("calibration needs a decoder of at least 2 layers (prune layers are 1..L-1)")
    change = np.maximum(0.0, 1.0 - np.asarray(similarity, np.float64))
    total = change.sum()
    cumulative = (np.concatenate([[0.0], np.cumsum(change)]) / total if total > 0
                  else np.arange(num_layers + 1) / num_layers)
    stages = min(len(BTP_REFERENCE_LAYERS), num_layers - 1)
    refs = (BTP_REFERENCE_LAYERS if stages == len(BTP_REFERENCE_LAYERS)
            else (*BTP_REFERENCE_LAYERS[:stages - 1], BTP_REFERENCE_LAYERS[-1]))
    layers, previous = [], 0
    for s, ref in enumerate(refs):
        target = float(Fraction(ref, BTP_REFERENCE_NUM_LAYERS))
        k = next((k for k in range(1, num_layers) if cumulative[k] >= target), num_layers - 1)
        k = min(max(k, previous + 1), num_layers - 1 - (stages - 1 - s))
        layers.append(k)
        previous = k
    counts = btp_fitting_counts(num_image_tokens, stages)
    return ",".join(f"{k}:{c}" for k, c in zip(layers, counts))


def calibrate(opts: CalibrateOptions, progress: Callable[[str], None] | None = None,
              command: str | None = None) -> dict:
    """Measure, suggest, write ``calibration.json`` and ``similarity.png`` under ``opts.out``."""
    from feather_export.methods.config import PruneConfig
    from feather_export.models.geometry import geometry_of

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    items, source = _items(opts)                              # checked before the model loads
    if opts.out is not None and Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise FeatherError(f"--out {opts.out} exists and is not a directory")
    if opts.threads < 0:
        raise FeatherError("--threads must be >= 0")
    with _model(opts.model) as (model, preprocessor, builder):
        geo = geometry_of(model.config)
        sims = []
        with _torch_threads(opts.threads):
            for i, item in enumerate(items, 1):
                say(f"calibrate: item {i}/{len(items)}")
                pixels = preprocessor(item.image())
                ids = builder.build(item.question, geo.num_image_tokens)
                sims.append(layer_similarity(model, pixels, ids))
    sims = np.asarray(sims, np.float64)
    mean = sims.mean(axis=0)
    schedule = suggest_schedule(mean, geo.num_image_tokens)
    PruneConfig.create("btp", geo, schedule=schedule)          # taken as is by --schedule
    change = np.maximum(0.0, 1.0 - mean)
    result = {
        "model": opts.model, "source": source, "n": len(items),
        "num_layers": geo.num_layers, "num_image_tokens": geo.num_image_tokens,
        "similarity": [round(float(v), 6) for v in mean],
        "similarity_std": [round(float(v), 6) for v in sims.std(axis=0)],
        "similarity_definition": "layer l: mean over image tokens of cos(hidden entering layer l, "
                                 "hidden leaving it), fp32, mean over items",
        "cumulative_change": [round(float(v), 6) for v in
                              np.concatenate([[0.0], np.cumsum(change)]) / max(change.sum(), 1e-300)],
        "rule": RULE,
        "suggested_schedule": schedule,
        "usage": f"feather-export build --method btp --schedule {schedule}",
        "command": command,
    }
    if opts.out is not None:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "calibration.json").write_text(json.dumps(result, indent=2) + "\n")
        plot = plot_similarity(result, out / "similarity.png")
        say(f"wrote {out / 'calibration.json'}, {plot}")
    return result


def layer_similarity(model, pixel_values, input_ids) -> np.ndarray:
    """[L]: per layer, the mean cosine similarity of the image tokens entering and leaving it."""
    import torch

    from feather_export.methods.reference import (_causal_mask, image_span, run_layer,
                                                  vision_features)
    from feather_export.methods.scoring import cls_attention_scores
    from feather_export.models.geometry import geometry_of

    geo = geometry_of(model.config)
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long).reshape(1, -1)
    start = image_span(ids, model.config.image_token_index, geo.num_image_tokens)
    lm = model.model.language_model
    out = []
    with torch.no_grad():
        features, _ = vision_features(model, torch.as_tensor(np.asarray(pixel_values), dtype=torch.float32),
                                      cls_attention_scores)
        hidden = lm.embed_tokens(ids)
        hidden = torch.cat([hidden[:, :start], features.to(hidden.dtype),
                            hidden[:, start + geo.num_image_tokens:]], dim=1).float()
        positions = torch.arange(hidden.shape[1])[None]
        mask = _causal_mask(hidden.shape[1], hidden.dtype)
        rows = slice(start, start + geo.num_image_tokens)
        for layer in lm.layers:
            nxt = run_layer(layer, lm.rotary_emb, hidden, positions, None, mask)
            cos = torch.nn.functional.cosine_similarity(hidden[0, rows], nxt[0, rows], dim=-1)
            out.append(float(cos.mean()))
            hidden = nxt
    return np.asarray(out, np.float64)


def _items(opts: CalibrateOptions) -> tuple[list, str]:
    if (opts.data is None) == (opts.synthetic is None):
        raise FeatherError("give exactly one of --data FILE.jsonl or --synthetic N")
    if opts.data is not None:
        from feather_export.quality.userdata import load_data

        return list(load_data(opts.data)), str(Path(opts.data).resolve())
    if isinstance(opts.synthetic, bool) or not isinstance(opts.synthetic, int) or opts.synthetic < 1:
        raise FeatherError(f"--synthetic must be a positive integer, got {opts.synthetic!r}")
    from feather_export.quality.synthetic import make_samples

    samples = make_samples("val", opts.synthetic, seed=opts.seed)
    return ([CalibItem(s.question, s.image) for s in samples],
            f"shapes task, val split, seed {opts.seed}")


@contextmanager
def _model(spec: str):
    """(model, preprocessor, prompt builder); built-in in-process models get the tiny tokenizer
    and a CLIP preprocessor config written to a temporary directory, as export does."""
    from feather_runtime.preprocess import ImagePreprocessor, write_preprocessor_config
    from feather_runtime.prompt import PromptBuilder

    from feather_export.models.checkpoint import load_config, resolve_model
    from feather_export.models.tokenizer import save_tiny_tokenizer

    load_config(spec)                                           # refuses bad specs before weights
    model, source = resolve_model(spec)
    if source is not None:
        yield model, ImagePreprocessor.from_dir(source), PromptBuilder.from_dir(source)
        return
    with tempfile.TemporaryDirectory(prefix="feather-calibrate-") as tmp:
        save_tiny_tokenizer(Path(tmp))
        write_preprocessor_config(Path(tmp), model.config.vision_config.image_size)
        yield model, ImagePreprocessor.from_dir(tmp), PromptBuilder.from_dir(tmp)


@contextmanager
def _torch_threads(threads: int):
    from feather_export.quality.evaluate import _torch_threads as threads_ctx

    with threads_ctx(threads):
        yield


def plot_similarity(result: dict, out: Path) -> Path:
    """similarity per layer with the suggested stage layers marked (matplotlib, else Pillow)."""
    sims = result["similarity"]
    stages = [int(p.split(":")[0]) for p in result["suggested_schedule"].split(",")]
    try:
        import matplotlib
    except ImportError:
        return _plot_pillow(sims, stages, result, out)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(len(sims)), sims, "o-", color="tab:purple", label="image-token similarity")
    for k in stages:
        ax.axvline(k - 0.5, color="0.4", ls="--", lw=1)
    ax.set_xlabel("decoder layer l (dashed: suggested BTP prune points, before layer K)")
    ax.set_ylabel("mean cos(hidden in, hidden out)")
    ax.set_title(f"{result['model']}: {result['n']} items; --schedule {result['suggested_schedule']}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_pillow(sims, stages, result, out: Path) -> Path:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    lo, hi = min(sims), max(sims)
    span = (hi - lo) or 1.0

    def xy(i, v):
        return (pad + (w - 2 * pad) * i / max(1, len(sims) - 1),
                h - pad - (h - 2 * pad) * (v - lo) / span)

    draw.rectangle((pad, pad, w - pad, h - pad), outline=(180, 180, 180))
    for k in stages:
        x = xy(k - 0.5, lo)[0]
        draw.line((x, pad, x, h - pad), fill=(120, 120, 120))
    draw.line([xy(i, v) for i, v in enumerate(sims)], fill=(148, 103, 189), width=2)
    draw.text((pad, 8), f"similarity per layer ({lo:.3f}..{hi:.3f}); --schedule "
              f"{result['suggested_schedule']} (matplotlib not installed)", fill=(0, 0, 0))
    im.save(out, format="PNG")
    return out
