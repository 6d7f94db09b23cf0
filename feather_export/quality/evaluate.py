"""``feather-export eval``: what each pruning method and budget costs in answers, on the shapes task.

For ``none`` and every method x budget, the held-out split of the synthetic grounding task
(``synthetic.py``) is answered greedily through the exported ONNX artifact (``feather_runtime``,
one export per configuration into a temporary directory) and/or the PyTorch reference, and scored
by exact match: per question type, per row band of the object asked about (top / middle / bottom),
plus two diagnostics of *where* the kept tokens are: the share of the last stage's kept tokens in
each band, and how often at least one patch of the asked-about object survives the last stage.
"""
from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from feather_export.errors import FeatherError
from feather_export.quality.synthetic import QUESTION_TYPES, ROWS, SPLITS, Sample, make_samples

DEFAULT_MODEL = "tiny-shapes"          # the trained built-in checkpoint (models.BUILTIN_CHECKPOINTS)
METHODS = ("none", "feather", "fastv", "fastervlm", "btp")
# BTP is evaluated on request (--methods ...,btp or --schedule btp=...): its default schedule
# needs a decoder deep enough for four stages (the 4-layer tiny-shapes model is not)
DEFAULT_METHODS = ("none", "feather", "fastv", "fastervlm")
ENGINES = ("onnx", "reference")
LLAVA_BUDGETS = (144, 64, 32)         # LLaVA-1.5's usual budgets, out of 576 image tokens
LLAVA_IMAGE_TOKENS = 576
BANDS = ROWS                          # top / middle / bottom
DEFAULT_N = 300                       # shapes-task samples evaluated by default


@dataclass(frozen=True)
class EvalConfig:
    """One configuration evaluated: a method and its first-stage budget (None for ``none``), or
    an explicit schedule (``LAYER:KEEP[,LAYER:KEEP]``; ``budget`` is then its first keep)."""

    method: str
    budget: int | None
    schedule: str | None = None

    @property
    def name(self) -> str:
        if self.schedule is not None:
            return f"{self.method}[{self.schedule}]"
        return self.method if self.budget is None else f"{self.method}@{self.budget}"

    @property
    def file_name(self) -> str:
        return self.name.replace("@", "_b").replace("[", "_s").replace("]", "").replace(
            ":", "-").replace(",", "_")

    def prune_config(self, geometry):
        from feather_export.methods.config import PruneConfig

        if self.schedule is not None:
            return PruneConfig.create(self.method, geometry, schedule=self.schedule)
        return PruneConfig.create(self.method, geometry, budget=self.budget)


@dataclass(frozen=True)
class EvalOptions:
    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[int, ...] | None = None     # None: the grid's equivalents of 144 / 64 / 32
    schedules: tuple[tuple[str, str], ...] = ()  # extra (method, "LAYER:KEEP,...") configurations
    n: int | None = None                       # samples (None: 300 of the split; all of --data)
    engines: tuple[str, ...] = ENGINES
    seed: int = 0
    split: str = "test"
    out: str | None = None
    overlays: int = 2                          # examples per configuration (0: none)
    threads: int = 1                           # torch / ONNX Runtime intra-op threads (0: default)
    max_new_tokens: int = 4                    # answers are <= 2 tokens + EOS
    data: str | None = None                    # a user's .jsonl file instead of the shapes task
    max_text_tokens: int = 64                  # prompt bound of the exported artifacts


@dataclass
class Prediction:
    text: str
    token_ids: list[int]
    kept: list[list[int]]


@dataclass
class EngineRun:
    predictions: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0


# ---- option parsing (the CLI's strings -> typed values) ------------------------------------------

def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(dict.fromkeys(m.strip().lower() for m in text.split(",") if m.strip()))
    if not methods:
        raise FeatherError("--methods is empty; write e.g. --methods none,feather,fastv,fastervlm")
    for m in methods:
        if m not in METHODS:
            raise FeatherError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    return methods


def parse_budgets(text: str) -> tuple[int, ...]:
    try:
        budgets = tuple(dict.fromkeys(int(b) for b in text.split(",") if b.strip()))
    except ValueError:
        raise FeatherError(f"--budgets {text!r} is not a comma-separated list of integers, "
                           "e.g. --budgets 64,28,14") from None
    if not budgets or any(b < 1 for b in budgets):
        raise FeatherError(f"--budgets {text!r}: give positive integers, e.g. --budgets 64,28,14")
    return budgets


def parse_schedules(items) -> tuple[tuple[str, str], ...]:
    """``["feather=1:136", "fastv=1:26"]`` -> ((method, schedule), ...); the schedules themselves
    are checked against the model in ``plan_configs``."""
    out = []
    for item in items or ():
        method, sep, schedule = item.partition("=")
        method, schedule = method.strip(), schedule.replace(" ", "")
        if not sep or method not in METHODS or method == "none" or not schedule:
            raise FeatherError(f"--schedule {item!r} is not METHOD=LAYER:KEEP[,LAYER:KEEP], e.g. "
                               "--schedule feather=1:136 (METHOD one of feather, fastv, fastervlm, "
                               "btp)")
        out.append((method, schedule))
    return tuple(dict.fromkeys(out))


def parse_engines(text: str) -> tuple[str, ...]:
    if text == "both":
        return ENGINES
    if text in ENGINES:
        return (text,)
    raise FeatherError(f"--engine {text!r}: choose onnx, reference or both")


def default_budgets(num_image_tokens: int) -> tuple[int, ...]:
    """LLaVA-1.5's budgets 144 / 64 / 32 (of 576) scaled to the same kept fractions of this grid."""
    scaled = (max(1, round(b * num_image_tokens / LLAVA_IMAGE_TOKENS)) for b in LLAVA_BUDGETS)
    return tuple(dict.fromkeys(scaled))


def plan_configs(methods: Sequence[str], budgets: Sequence[int], geometry,
                 schedules: Sequence[tuple[str, str]] = ()) -> list[EvalConfig]:
    """``none`` once, then every pruning method x budget, then the explicit schedules; each
    validated against the model."""
    configs = []
    if "none" in methods:
        configs.append(EvalConfig("none", None))
    # BTP's counts come from its schedule: --methods btp is its default schedule, once
    candidates = [EvalConfig(m, None if m == "btp" else b) for m in methods if m != "none"
                  for b in (budgets[:1] if m == "btp" else budgets)]
    for method, schedule in schedules:
        candidates.append(EvalConfig(method, None, schedule))
    for config in candidates:
        try:
            prune = config.prune_config(geometry)
        except FeatherError as exc:
            raise FeatherError(f"{config.name}: {exc}") from None
        if config.schedule is not None or config.budget is None:
            config = EvalConfig(config.method, prune.stages[0].keep, config.schedule)
        configs.append(config)
    return configs


# ---- scoring --------------------------------------------------------------------------------------

def is_correct(sample: Sample, text: str) -> bool:
    """Exact match after trimming whitespace and a trailing full stop."""
    return text.strip().rstrip(".").strip().lower() == sample.answer.lower()


def accuracy_table(samples: Sequence[Sample], correct: Sequence[bool]) -> dict:
    """Accuracy overall, per question type, per band, per band x type (with counts)."""
    correct = np.asarray(correct, bool)

    def cell(mask) -> dict:
        mask = np.asarray(mask, bool)
        n = int(mask.sum())
        return {"accuracy": float(correct[mask].mean()) if n else None, "n": n}

    qtypes = np.array([s.qtype for s in samples])
    bands = np.array([s.band or "" for s in samples])
    return {
        "all": cell(np.ones(len(samples), bool)),
        "by_type": {t: cell(qtypes == t) for t in QUESTION_TYPES},
        "by_band": {b: cell(bands == b) for b in BANDS},
        "by_band_type": {b: {t: cell((bands == b) & (qtypes == t)) for t in QUESTION_TYPES if t != "count"}
                         for b in BANDS},
    }


def patch_band(index: int, grid_side: int) -> str:
    """Row band of an image token by the centre of its patch row."""
    row = index // grid_side
    return BANDS[min(len(BANDS) - 1, int((row + 0.5) * len(BANDS) / grid_side))]


def object_patches(sample: Sample, grid_side: int) -> set[int]:
    """Image-token indices whose patch overlaps the bounding box of the asked-about object."""
    obj = sample.scene.objects[sample.target]
    x0, y0, x1, y1 = obj.bbox()
    cell = sample.scene.image_size / grid_side
    cols = range(int(x0 // cell), int((x1 - 1) // cell) + 1)
    rows = range(int(y0 // cell), int((y1 - 1) // cell) + 1)
    return {r * grid_side + c for r in rows for c in cols if 0 <= r < grid_side and 0 <= c < grid_side}


def kept_diagnostics(samples: Sequence[Sample], predictions: Sequence[Prediction], grid_side: int,
                     raster_offset: int = 0) -> dict:
    """Where the kept tokens lie, and whether the asked-about object survives: after the last
    stage (what the final layers see) and after the first (comparable across methods at one
    first-stage budget: FEATHER's second stage keeps far fewer tokens than FastV's only stage).
    Image token i is patch i - ``raster_offset``; tokens before the raster (a CLS under strategy
    ``full``) lie in no band."""
    if not predictions or not predictions[0].kept:
        return {}
    out = {}
    for label, stage in (("", -1), ("_first", 0)):
        share = {b: [] for b in BANDS}
        survived = {b: [] for b in BANDS}
        for s, p in zip(samples, predictions):
            kept = p.kept[stage]
            patches = [i - raster_offset for i in kept if i >= raster_offset]
            bands = [patch_band(i, grid_side) for i in patches]
            for b in BANDS:
                share[b].append(bands.count(b) / max(1, len(kept)))
            if s.target is not None:
                survived[s.band].append(bool(object_patches(s, grid_side) & set(patches)))
        out[f"{'last' if not label else 'first'}_stage_kept"] = len(predictions[0].kept[stage])
        out[f"kept_share_by_band{label}"] = {b: float(np.mean(v)) for b, v in share.items()}
        out[f"object_kept_by_band{label}"] = {b: (float(np.mean(v)) if v else None)
                                              for b, v in survived.items()}
    return out


# ---- engines --------------------------------------------------------------------------------------

def _load_pipeline(path: Path, threads: int):
    from feather_runtime import Pipeline
    from feather_runtime.backends.onnxruntime import OnnxRuntimeBackend
    from feather_runtime.manifest import load_manifest

    if not threads:
        return Pipeline.load(path)
    manifest = load_manifest(path)
    backend = OnnxRuntimeBackend(device="cpu", threads=threads)
    return Pipeline(manifest, backend, {s.name: backend.load(manifest.root, s) for s in manifest.segments})


def run_onnx(model_dir: Path, config: EvalConfig, samples: Sequence[Sample], work: Path,
             opts: EvalOptions, on_result: Callable | None = None) -> EngineRun:
    """Export ``config`` into ``work`` and answer every sample through feather_runtime."""
    from feather_export.export.artifact import ExportOptions, export

    budget = config.budget if config.schedule is None else None
    art = export(model_dir, work / config.file_name,
                 ExportOptions(method=config.method, budget=budget, schedule=config.schedule,
                               max_new_tokens=opts.max_new_tokens,
                               max_text_tokens=opts.max_text_tokens),
                 progress=lambda msg: None)
    pipe = _load_pipeline(art, opts.threads)
    run = EngineRun()
    t0 = time.perf_counter()
    for s in samples:
        image = s.image()
        res = pipe.generate(image=image, prompt=s.question, max_new_tokens=opts.max_new_tokens)
        run.predictions.append(Prediction(res.text, list(res.token_ids), [list(k) for k in res.kept]))
        if on_result is not None:
            on_result(s, image, res, pipe)
    run.seconds = time.perf_counter() - t0
    return run


class ReferenceEngine:
    """The PyTorch reference on the checkpoint, with the checkpoint's preprocessing and tokenizer."""

    def __init__(self, model_dir: Path):
        from feather_runtime.preprocess import ImagePreprocessor
        from feather_runtime.prompt import PromptBuilder

        from feather_export.models.geometry import geometry_of
        from feather_export.models.checkpoint import load_checkpoint

        self.model = load_checkpoint(model_dir)
        self.geometry = geometry_of(self.model.config)
        self.preprocessor = ImagePreprocessor.from_dir(model_dir)
        self.builder = PromptBuilder.from_dir(model_dir)
        self._inputs: dict[int, tuple] = {}

    def inputs(self, sample: Sample):
        key = id(sample)
        if key not in self._inputs:
            self._inputs[key] = (self.preprocessor(sample.image()),
                                 self.builder.build(sample.question, self.model.config.image_seq_length))
        return self._inputs[key]

    def run(self, config: EvalConfig, samples: Sequence[Sample], max_new_tokens: int) -> EngineRun:
        from feather_export.methods.reference import reference_generate

        run = EngineRun()
        t0 = time.perf_counter()
        for s in samples:
            pixels, ids = self.inputs(s)
            res = reference_generate(self.model, pixels, ids, config=config.prune_config(self.geometry),
                                     max_new_tokens=max_new_tokens)
            run.predictions.append(Prediction(self.builder.decode(res.token_ids), list(res.token_ids),
                                              [list(k) for k in res.kept]))
        run.seconds = time.perf_counter() - t0
        return run


# ---- the evaluation -------------------------------------------------------------------------------

def _check_options(opts: EvalOptions) -> None:
    if opts.split not in SPLITS:
        raise FeatherError(f"--split {opts.split!r}: choose one of {', '.join(SPLITS)}")
    if opts.n is not None and (isinstance(opts.n, bool) or not isinstance(opts.n, int) or opts.n < 1):
        raise FeatherError(f"--n must be a positive integer, got {opts.n!r}")
    if not opts.engines or any(e not in ENGINES for e in opts.engines):
        raise FeatherError(f"engines must be among {', '.join(ENGINES)}")
    if opts.overlays < 0 or opts.threads < 0 or opts.max_new_tokens < 1:
        raise FeatherError("--overlays and --threads must be >= 0, --max-new-tokens >= 1")
    if opts.out is not None and Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise FeatherError(f"--out {opts.out} exists and is not a directory")


def _overlay_picks(samples: Sequence[Sample], k: int) -> list[int]:
    """Up to k example indices, alternating top-, bottom- and middle-band questions (any other
    sample where the split has no question of that band left)."""
    picks: list[int] = []
    wanted = ["top", "bottom", "middle"]
    for i in range(min(k, len(samples))):
        band = wanted[i % len(wanted)]
        idx = next((j for j, s in enumerate(samples) if s.band == band and j not in picks), None)
        if idx is None:
            idx = next(j for j in range(len(samples)) if j not in picks)
        picks.append(idx)
    return picks


def evaluate(opts: EvalOptions, progress: Callable[[str], None] | None = None,
             command: str | None = None) -> dict:
    """Run the evaluation; write results.json, the table, the plot and overlays under ``opts.out``.

    ``command``: the command line that ran it, recorded in the results for reproduction."""
    from feather_export.models.checkpoint import check_checkpoint_dir, checkpoint_path, load_config
    from feather_export.models.geometry import geometry_of

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    _check_options(opts)
    if opts.data is not None:
        from feather_export.quality.evaluate_data import evaluate_data

        return evaluate_data(opts, say, command)
    model_dir = check_checkpoint_dir(checkpoint_path(opts.model))
    geometry = geometry_of(load_config(model_dir))
    budgets = opts.budgets or default_budgets(geometry.num_image_tokens)
    configs = plan_configs(opts.methods, budgets, geometry, opts.schedules)
    out = Path(opts.out) if opts.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if opts.overlays:
            (out / "overlays").mkdir(exist_ok=True)
    samples = make_samples(opts.split, opts.n or DEFAULT_N, seed=opts.seed)
    picks = _overlay_picks(samples, opts.overlays) if out is not None else []
    say(f"eval: {len(samples)} {opts.split} samples x {len(configs)} configurations "
        f"({', '.join(c.name for c in configs)}) on {', '.join(opts.engines)}; "
        f"{geometry.num_image_tokens} image tokens ({geometry.grid_side}x{geometry.grid_side})")
    with _torch_threads(opts.threads if "reference" in opts.engines else 0):
        rows, seconds = _run_configs(opts, model_dir, configs, samples, picks, out, geometry, say)
    results = _results(opts, model_dir, geometry, budgets, samples, rows, seconds, command)
    if out is not None:
        _write_outputs(out, results, say)
    return results


def _cost(config: EvalConfig, geometry, text_config, text_tokens: int) -> dict:
    counts = image_tokens_per_layer(config, geometry)
    ffn = text_config.intermediate_size
    return {"image_tokens_per_layer": counts,
            "relative_prefill_flops": round(relative_prefill_flops(
                counts, geometry.num_image_tokens, text_tokens, text_config.hidden_size, ffn), 4)}


def _mean_text_tokens(model_dir: Path, samples: Sequence[Sample]) -> int:
    """Mean prompt length in text tokens (the prompt built with one image token, minus it)."""
    from feather_runtime.prompt import PromptBuilder

    builder = PromptBuilder.from_dir(model_dir)
    lengths = [builder.build(s.question, 1).shape[1] - 1 for s in samples]
    return round(float(np.mean(lengths)))


def _run_configs(opts, model_dir, configs, samples, picks, out, geometry, say) -> tuple[list, float]:
    from feather_export.models.checkpoint import load_config

    text_config = load_config(model_dir).text_config
    text_tokens = _mean_text_tokens(model_dir, samples)
    reference = ReferenceEngine(model_dir) if "reference" in opts.engines else None
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="feather-eval-") as work:
        for config in configs:
            runs: dict[str, EngineRun] = {}
            if "onnx" in opts.engines:
                hook = _overlay_hook(config, samples, picks, out, geometry.grid_side)
                runs["onnx"] = run_onnx(model_dir, config, samples, Path(work), opts, hook)
            if reference is not None:
                runs["reference"] = reference.run(config, samples, opts.max_new_tokens)
            rows.append(_score_config(config, samples, runs, geometry.grid_side,
                                      _cost(config, geometry, text_config, text_tokens),
                                      raster_offset=geometry.raster_offset))
            say(_progress_line(rows[-1]))
    return rows, time.perf_counter() - t_start


@contextlib.contextmanager
def _torch_threads(threads: int):
    """Run with ``threads`` torch intra-op threads (0: unchanged), restoring the setting after."""
    if not threads:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _results(opts, model_dir, geometry, budgets, samples, rows, seconds, command) -> dict:
    return {
        "model": str(model_dir.resolve()),
        "task": "synthetic shapes grounding (feather_export.quality.synthetic)",
        "split": opts.split, "seed": opts.seed, "n": len(samples),
        "num_image_tokens": geometry.num_image_tokens, "grid_side": geometry.grid_side,
        "num_layers": geometry.num_layers,
        "budgets": list(budgets),
        "schedules": [f"{m}={sch}" for m, sch in opts.schedules],
        "budget_note": (f"first-stage budgets; the default is LLaVA-1.5's {'/'.join(map(str, LLAVA_BUDGETS))} "
                        f"of {LLAVA_IMAGE_TOKENS} scaled to {geometry.num_image_tokens} tokens"
                        if opts.budgets is None else "first-stage budgets as given"),
        "engines": list(opts.engines),
        "question_counts": {t: sum(s.qtype == t for s in samples) for t in QUESTION_TYPES},
        "band_counts": {b: sum(s.band == b for s in samples) for b in BANDS},
        "configs": rows,
        "wall_time_s": round(seconds, 1),
        "command": command,
    }


def _overlay_hook(config: EvalConfig, samples, picks, out: Path | None, grid_side: int):
    if out is None or not picks:
        return None
    wanted = {id(samples[i]): n for n, i in enumerate(picks)}

    def hook(sample, image, result, pipe):
        from feather_export.quality.overlay import draw_pipeline_overlay

        n = wanted.get(id(sample))
        if n is None:
            return
        ok = "right" if is_correct(sample, result.text) else "wrong"
        where = f", {sample.band} band" if sample.band else ""
        title = f"{config.name}: {sample.question} -> {result.text!r} ({ok}; answer {sample.answer!r}{where})"
        name = f"{config.file_name}_ex{n}_{sample.band or sample.qtype}.png"
        draw_pipeline_overlay(pipe, image, result, out / "overlays" / name, title=title)

    return hook


def image_tokens_per_layer(config: EvalConfig, geometry) -> list[int]:
    """Image tokens in the input of each decoder layer under ``config``."""
    prune = config.prune_config(geometry)
    counts = [geometry.num_image_tokens] * geometry.num_layers
    for stage in prune.stages:
        start = 0 if stage.criterion == "fastervlm" else stage.layer
        counts[start:] = [stage.keep] * (geometry.num_layers - start)
    return counts


def relative_prefill_flops(counts: Sequence[int], num_image_tokens: int, text_tokens: int,
                           hidden: int, ffn: int) -> float:
    """Decoder prefill FLOPs (docs/design.md §5) relative to keeping every image token in every layer."""
    def flops(n: int) -> float:
        return 2 * n * (4 * hidden ** 2 + 3 * hidden * ffn) + 2 * n * n * hidden

    pruned = sum(flops(text_tokens + c) for c in counts)
    return pruned / (len(counts) * flops(text_tokens + num_image_tokens))


def _score_config(config: EvalConfig, samples, runs: dict[str, EngineRun], grid_side: int,
                  cost: dict, raster_offset: int = 0) -> dict:
    row: dict = {"method": config.method, "budget": config.budget, "schedule": config.schedule,
                 "name": config.name, **cost,
                 "engines": {}}
    for engine, run in runs.items():
        correct = [is_correct(s, p.text) for s, p in zip(samples, run.predictions)]
        row["engines"][engine] = {**accuracy_table(samples, correct),
                                  **kept_diagnostics(samples, run.predictions, grid_side,
                                                     raster_offset),
                                  "seconds": round(run.seconds, 2)}
    if len(runs) == 2:
        a, b = runs["onnx"].predictions, runs["reference"].predictions
        row["onnx_reference_agreement"] = {
            "token_ids": float(np.mean([x.token_ids == y.token_ids for x, y in zip(a, b)])),
            "kept": float(np.mean([x.kept == y.kept for x, y in zip(a, b)])),
        }
    return row


def _fmt(value) -> str:
    return "  -  " if value is None else f"{100 * value:5.1f}"


def _progress_line(row: dict) -> str:
    parts = []
    for engine, r in row["engines"].items():
        parts.append(f"{engine} {_fmt(r['all']['accuracy']).strip()}% ({r['seconds']:.0f}s)")
    agree = row.get("onnx_reference_agreement")
    tail = f", onnx=reference on {100 * agree['token_ids']:.1f}% of answers" if agree else ""
    return f"  {row['name']:<20} " + ", ".join(parts) + tail


def format_table(results: dict) -> str:
    """The terminal table: accuracy (%) per configuration and engine, by question type and band,
    then where the kept tokens are (object survival and token share per band, first/last stage)."""
    head = (f"{'config':<20} {'engine':<9} {'all':>5} | {'colour':>6} {'count':>5} {'where':>5} | "
            f"{'top':>5} {'middle':>6} {'bottom':>6} | obj kept 1st t/m/b | obj kept last t/m/b | "
            "kept 1st t/m/b")
    lines = [f"accuracy (%) on {results['n']} {results['split']} samples, "
             f"{results['num_image_tokens']} image tokens; {results['budget_note']}", head, "-" * len(head)]

    def bands(values) -> str:
        return "/".join(_fmt(values[k]).strip() for k in BANDS) if values else "-"

    for row in results["configs"]:
        for engine, r in row["engines"].items():
            t, b = r["by_type"], r["by_band"]
            lines.append(
                f"{row['name']:<20} {engine:<9} {_fmt(r['all']['accuracy'])} | "
                f"{_fmt(t['colour']['accuracy']):>6} {_fmt(t['count']['accuracy'])} {_fmt(t['where']['accuracy'])} | "
                f"{_fmt(b['top']['accuracy'])} {_fmt(b['middle']['accuracy']):>6} {_fmt(b['bottom']['accuracy']):>6} | "
                f"{bands(r.get('object_kept_by_band_first')):<18} | {bands(r.get('object_kept_by_band')):<19} | "
                f"{bands(r.get('kept_share_by_band_first'))}")
    lines.append("top/middle/bottom: questions about one object (colour, where), by the object's row band; "
                 "obj kept: the object keeps >= 1 patch after the first / last stage; kept: share of the "
                 "first stage's tokens in each band")
    return "\n".join(lines)


def _write_outputs(out: Path, results: dict, say: Callable[[str], None]) -> None:
    from feather_export.quality.plot import plot_accuracy

    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.txt").write_text(format_table(results) + "\n")
    plot = plot_accuracy(results, out / "accuracy_vs_budget.png")
    say(f"wrote {out / 'results.json'}, {out / 'table.txt'}, {plot}")
