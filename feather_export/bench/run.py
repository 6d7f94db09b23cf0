"""``feather-export bench``: pruned vs unpruned latency, measured side by side, next to the model.

Artifacts of one model, backend and precision are loaded together and run interleaved (the order
rotates every repeat), after warm-up. Every run generates ``max(gen_lengths)`` tokens; time to
first token comes from every run, and decode tokens/s at each shorter length is read from the same
run's step timeline (the first g-1 decode steps are the same whether or not generation goes on).
Per-call times come from wrapping each segment runner: the pipeline's own per-segment timings for
prefill, the wrapper's timestamps for each decode step (step time = from the end of the previous
step, so sampling and the runtime's bookkeeping are included).

``summarize`` turns samples into rows with FLOPs, bytes, roofline predictions, measured/predicted
and speed-ups against ``none`` (paired per repeat); it is shared with the torch path of
``benchmarks/gpu.py``.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from feather_export.errors import FeatherError

SCHEMA = "feather-export-bench/1"
DEFAULT_PROMPT = "Describe the image in detail."
CURVE_POINTS = 24
MIN_DECODE_SAMPLES = 2      # a decode row needs this many runs that reached its length
MIN_SLOPE_POINTS = 8        # decode steps needed to fit step time against cache length


# ---- options and targets -------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchOptions:
    repeats: int = 5
    warmup: int = 1
    gen_lengths: tuple[int, ...] = (1, 16, 64)
    backend: str | None = None
    device: str | None = None          # roofline device: cpu (measured) or a DEVICES key
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    verify: bool = True
    quick_microbench: bool = False
    threads: int | None = None         # ONNX Runtime intra-op threads (default: ORT's choice)
    ort_config: tuple[tuple[str, str], ...] = ()   # session config entries, e.g. allow_spinning
    cache_sweep: tuple[int, ...] = ()  # decode-step probe at these cache lengths (synthetic past)
    ignore_eos: bool = False           # generate max(gen_lengths) tokens past end-of-sequence

    def __post_init__(self):
        if self.repeats < 1:
            raise FeatherError(f"--repeats must be at least 1, got {self.repeats}")
        if self.warmup < 0:
            raise FeatherError(f"--warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise FeatherError(f"--threads must be at least 1, got {self.threads}")
        if not self.gen_lengths or min(self.gen_lengths) < 1:
            raise FeatherError(f"--gen-lengths must be positive integers, got {self.gen_lengths}")


def parse_gen_lengths(text: str, flag: str = "--gen-lengths") -> tuple[int, ...]:
    """A sorted, de-duplicated tuple of positive integers from "1,16,64"."""
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise FeatherError(f"{flag} {text!r} is not a comma-separated list of integers, "
                           "e.g. 1,16,64") from None
    if not values or values[0] < 1:
        raise FeatherError(f"{flag} {text!r}: give positive integers, e.g. 1,16,64")
    return values


@dataclass(frozen=True)
class Target:
    """One configuration under test: an artifact (or a torch configuration of the GPU script)."""

    label: str
    method: str
    prune: object              # PruneConfig
    shape: object              # perf_model.ModelShape
    dtype: str
    model_id: str
    path: str | None = None
    weights: object = None     # perf_model.WeightFormat (None: float)

    @property
    def budget(self) -> int:
        return self.prune.budget if self.prune.stages else self.shape.num_image_tokens

    def to_dict(self) -> dict:
        return {"label": self.label, "method": self.method, "budget": self.budget,
                "prune": self.prune.to_dict(), "dtype": self.dtype, "model": self.model_id,
                "path": self.path,
                "weights": self.weights.__dict__ if self.weights is not None else None}


def target_label(prune) -> str:
    if not prune.stages:
        return "none"
    keeps = "/".join(str(s.keep) for s in prune.stages)
    return f"{prune.method}@{keeps}"


def targets_from_manifests(manifests) -> list[Target]:
    """Check that artifacts are comparable (same model config, same precision, one ``none`` at
    most, no duplicates) and describe them."""
    from feather_export.methods.config import PruneConfig
    from feather_export.bench.perf_model import WeightFormat, shape_from_manifest

    if not manifests:
        raise FeatherError("give at least one artifact directory to benchmark")
    roots = [str(m.root.resolve()) for m in manifests]
    if len(set(roots)) != len(roots):
        raise FeatherError("the same artifact is given twice; give each directory once")
    first = manifests[0]
    for m in manifests[1:]:
        if m["model"]["config_sha256"] != first["model"]["config_sha256"]:
            raise FeatherError(
                f"{m.root} was exported from a different model ({m['model']['id']}) than "
                f"{first.root} ({first['model']['id']}); speed-ups only compare artifacts of one "
                "model: benchmark them separately")
        if m["dtype"] != first["dtype"]:
            raise FeatherError(
                f"{m.root} is {m['dtype']} but {first.root} is {first['dtype']}; compare artifacts "
                "of one precision (export them with the same --dtype)")
    shape = shape_from_manifest(first)
    targets = []
    for m in manifests:
        prune = PruneConfig.from_dict(m["prune"])
        weights = WeightFormat.from_manifest(m.data.get("quantization"))
        targets.append(Target(target_label(prune) + weights.label, prune.method, prune, shape,
                              m["dtype"], m["model"]["id"], str(m.root), weights))
    labels = [t.label for t in targets]
    if labels.count("none") > 1:
        raise FeatherError("more than one `none` artifact given; keep one as the reference")
    for i, t in enumerate(targets):          # same method and counts, other schedule: disambiguate
        if labels.count(t.label) > 1:
            layers = ",".join(str(s.layer) for s in t.prune.stages)
            targets[i] = Target(f"{t.label}[L{layers}]#{i}", t.method, t.prune, t.shape, t.dtype,
                                t.model_id, t.path, t.weights)
    return targets


# ---- machine -------------------------------------------------------------------------------------

def describe_machine(backend_name: str | None = None) -> dict:
    from feather_export import __version__
    from feather_export.bench.perf_model import cpu_model_name

    info = {
        "cpu": cpu_model_name(), "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": _meminfo_gib(), "platform": platform.platform(),
        "python": sys.version.split()[0], "numpy": np.__version__,
        "feather_export": __version__, "backend": backend_name,
        "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "ORT_NUM_THREADS")
                        if k in os.environ},
    }
    try:
        import onnxruntime as ort
        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    gpus = gpu_names()
    if gpus:
        info["gpus"] = gpus
    return info


def _meminfo_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def gpu_names() -> list[str]:
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def resolve_device(key: str | None, backend_name: str, quick: bool = False,
                   say: Callable[[str], None] = lambda m: None, threads: int | None = None):
    """The roofline device: the one named, the GPU nvidia-smi reports, or this CPU (measured)."""
    from feather_export.bench.perf_model import device_for_gpu_name, get_device, measure_cpu_device

    if key == "cpu" or (key is None and backend_name.endswith("cpu")):
        say("measuring this CPU's matmul peak and memory bandwidth (micro-benchmark)")
        return measure_cpu_device(quick=quick, threads=threads)
    if key is not None:
        return get_device(key)
    for name in gpu_names():
        device = device_for_gpu_name(name)
        if device is not None:
            return device
    raise FeatherError(f"cannot tell which GPU the {backend_name} backend runs on; pass --device "
                       "(h100-sxm, h200, a100, agx-orin, orin-nano)")


# ---- measurement ---------------------------------------------------------------------------------

class _TimedRunner:
    """Wraps a segment runner; logs (name, start, end, new tokens, past length) per call. On a GPU
    backend the end is when the call returned (the Pipeline synchronizes per segment in prefill
    only), so decode steps are timed as a whole, by their ``embed`` boundaries."""

    def __init__(self, runner, log: list):
        self.runner, self.log, self.name = runner, log, runner.name

    def run_device(self, inputs: dict) -> dict:
        seq = past = None
        x = inputs.get("inputs_embeds", inputs.get("input_ids"))
        if x is not None:
            seq = int(x.shape[1])
        if "past_length" in inputs:                   # decoder spans: valid rows of the cache
            past = int(inputs["past_length"].host)
        t0 = time.perf_counter()
        out = self.runner.run_device(inputs)
        self.log.append((self.name, t0, time.perf_counter(), seq, past))
        return out

    def run(self, feeds: dict) -> dict:
        return self.runner.run(feeds)


def parse_ort_config(items) -> tuple[tuple[str, str], ...]:
    out = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FeatherError(f"--ort-config {item!r} is not KEY=VALUE, e.g. "
                               "session.intra_op.allow_spinning=0")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def instrument(pipeline) -> list:
    log: list = []
    pipeline.runners = {name: _TimedRunner(r, log) for name, r in pipeline.runners.items()}
    return log


def split_timeline(log: list, prompt_len: int) -> tuple[float, list[dict]]:
    """(end of prefill, decode steps) from one run's call log. A decode step starts with an
    ``embed`` call on one token; its time runs from the end of the previous step (or prefill)."""
    starts = [i for i, (name, _, _, seq, _) in enumerate(log) if name == "embed" and seq == 1]
    prefill_calls = log[:starts[0]] if starts else log
    prefill_end = prefill_calls[-1][2]
    steps, previous = [], prefill_end
    bounds = starts + [len(log)]
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        calls = log[lo:hi]
        end = calls[-1][2]
        spans = {name: past for name, _, _, _, past in calls if past is not None}
        steps.append({"k": k, "past": prompt_len + k, "spans": spans,
                      "seconds": end - previous,
                      "segments": {name: t1 - t0 for name, t0, t1, _, _ in calls}})
        previous = end
    return prefill_end, steps


def run_bench(paths, options: BenchOptions, progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark artifact directories (one model, backend, precision); returns the report dict."""
    from feather_runtime import Pipeline
    from feather_runtime.backends import get_backend
    from feather_runtime.manifest import load_manifest

    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    manifests = [load_manifest(p, verify=False) for p in paths]
    targets = targets_from_manifests(manifests)
    max_gen = max(options.gen_lengths)
    for m in manifests:
        if max_gen > m["max_new_tokens"]:
            raise FeatherError(f"--gen-lengths up to {max_gen} but {m.root} was built with "
                               f"--max-new-tokens {m['max_new_tokens']}; lower --gen-lengths")
    backend = get_backend(options.backend)
    if options.ort_config:
        if not hasattr(backend, "session_config"):
            raise FeatherError(f"--ort-config applies to the ONNX Runtime backends, not {backend.name}")
        backend.session_config = tuple(options.ort_config)
    if options.threads:
        if not hasattr(backend, "threads"):
            raise FeatherError(f"--threads is not supported by the {backend.name} backend")
        backend.threads = options.threads
    device = resolve_device(options.device, backend.name, options.quick_microbench, say,
                            threads=options.threads)
    machine = describe_machine(backend.name)
    machine["ort_intra_op_threads"] = options.threads or "default"
    machine["ort_session_config"] = dict(options.ort_config)
    pipes = []
    for t in targets:
        say(f"loading {t.label} from {t.path}" + (" (verifying sha256)" if options.verify else ""))
        t0 = time.perf_counter()
        manifest = load_manifest(t.path, verify=options.verify)
        runners = {seg.name: backend.load(manifest.root, seg) for seg in manifest.segments}
        pipes.append(Pipeline(manifest, backend, runners))
        say(f"  loaded in {time.perf_counter() - t0:.1f} s")
    logs = [instrument(p) for p in pipes]
    n_img = targets[0].shape.num_image_tokens
    size = manifests[0]["model"]["image_size"]
    pixels = np.random.default_rng(options.seed).standard_normal((1, 3, size, size),
                                                                 dtype=np.float32)
    ids = pipes[0].prompt_builder.build(options.prompt, n_img)
    prompt_len = int(ids.shape[1])
    samples = []
    total_runs = (options.warmup + options.repeats) * len(targets)
    run_no = 0
    for rep in range(-options.warmup, options.repeats):
        shift = rep % len(targets)
        order = list(range(len(targets)))[shift:] + list(range(len(targets)))[:shift]
        for pos, i in enumerate(order):
            run_no += 1
            logs[i].clear()
            load, cpu0, wall0 = _loadavg(), _cpu_seconds(), time.perf_counter()
            res = pipes[i].generate_ids(pixels, ids, max_gen, ignore_eos=options.ignore_eos)
            cpu, wall = _cpu_seconds() - cpu0, time.perf_counter() - wall0
            _, steps = split_timeline(logs[i], prompt_len)
            sample = {"target": targets[i].label, "repeat": rep, "warmup": rep < 0, "order": pos,
                      "tokens": len(res.token_ids), "timings": dict(res.timings),
                      "kept_counts": [len(k) for k in res.kept], "steps": steps,
                      "loadavg_1m": load, "wall_s": wall, "process_cpu_s": cpu}
            samples.append(sample)
            tag = "warm-up" if rep < 0 else f"repeat {rep + 1}/{options.repeats}"
            tps = res.timings.get("decode_tokens_per_s", 0.0)
            say(f"[{run_no:>3}/{total_runs}] {tag:<12} {targets[i].label:<16} ttft "
                f"{res.timings['ttft'] * 1e3:9.1f} ms  selection "
                f"{res.timings.get('selection', 0.0) * 1e3:7.1f} ms  decode {tps:7.2f} tok/s"
                + ("" if len(res.token_ids) == max_gen else
                   f"  (stopped at EOS after {len(res.token_ids)} tokens; --ignore-eos "
                   "measures decode past it)"))
    sweeps = {}
    if options.cache_sweep:
        for t, pipe in zip(targets, pipes):
            say(f"decode cache sweep of {t.label} at {', '.join(map(str, options.cache_sweep))}")
            sweeps[t.label] = cache_sweep(pipe, options.cache_sweep, repeats=3)
    del pipes
    return build_report(targets, samples, device, machine, options, prompt_len, backend.name,
                        sweeps=sweeps)


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): against wall time x threads it shows contention."""
    t = os.times()
    return t.user + t.system


def cache_sweep(pipe, lengths, repeats: int = 3) -> dict:
    """Time one decode step (S = 1) of every decoder span against a synthetic cache of each length
    (a static buffer of that capacity, all rows valid; zeros, the graphs' cost does not depend on
    the values). Returns seconds per span and length (median of ``repeats``), to compare with the
    attention term over a wide range of lengths. (The runtime's buffers have a fixed capacity, so
    a real decode step costs the attention over that capacity whatever the valid length.)"""
    from feather_runtime.pipeline import NUMPY_DTYPES

    dtype = NUMPY_DTYPES[pipe.manifest["dtype"]]
    hidden = pipe.manifest["model"]["hidden_size"]
    memory = pipe.memory              # the caches live where the backend runs (no host copies)
    out: dict = {"lengths": list(lengths), "spans": {}}
    for seg in pipe.manifest.segments:
        if seg.kind != "decoder":
            continue
        runner = getattr(pipe.runners[seg.name], "runner", pipe.runners[seg.name])
        times = []
        for length in lengths:
            feeds = {"inputs_embeds": np.zeros((1, 1, hidden), dtype),
                     "position_ids": np.asarray([[length]], np.int64),
                     "past_length": np.asarray(length, np.int64)}
            for spec in seg.inputs:
                if spec["name"].startswith("past_key_values."):
                    kv_heads, head_dim = spec["shape"][1], spec["shape"][3]
                    kind = pipe.value_dtype if spec["name"].endswith(".value") else pipe.key_dtype
                    feeds[spec["name"]] = np.zeros((1, kv_heads, length, head_dim), kind)
            inputs = {name: memory.upload(value) for name, value in feeds.items()}  # once
            del feeds
            runner.run_device(inputs)                             # warm this shape
            memory.synchronize()
            samples = []
            for _ in range(repeats):
                t = time.perf_counter()
                runner.run_device(inputs)
                memory.synchronize()
                samples.append(time.perf_counter() - t)
            times.append(float(np.median(samples)))
            for tensor in inputs.values():
                memory.release(tensor)
        out["spans"][seg.name] = {"layers": list(seg.layers), "seconds": times}
    return out


def summarize_sweep(target: Target, sweep: dict, device) -> dict:
    """Measured vs predicted decode-step time per cache length (all spans at that length)."""
    from feather_export.bench.perf_model import span_cost, roofline_seconds

    llm = target.shape.llm
    lengths = sweep["lengths"]
    measured = [sum(s["seconds"][i] for s in sweep["spans"].values())
                for i in range(len(lengths))]
    predicted = []
    for length in lengths:
        total_s = 0.0
        for s in sweep["spans"].values():
            a, b = s["layers"]
            total_s += roofline_seconds(span_cost(llm, b - a, 1, length, b == llm.layers,
                                                  _elem(target.dtype), weights=target.weights),
                                        device, target.dtype)
        predicted.append(total_s)
    out = {"lengths": lengths, "measured_s": measured, "predicted_s": predicted}
    if len(lengths) >= 2:
        fit = _fit_line(lengths, measured) if len(lengths) >= 3 else None
        slope = fit[0] if fit else (measured[-1] - measured[0]) / (lengths[-1] - lengths[0])
        pred = (predicted[-1] - predicted[0]) / (lengths[-1] - lengths[0])
        ratio = slope / pred if pred > 0 else None
        out.update(slope_s_per_token=slope, predicted_slope_s_per_token=pred,
                   slope_over_attention_term=ratio,
                   ok=bool(ratio is not None and ratio <= 2.0),
                   verdict=("ok: cost per cached token within 2x of the attention term"
                            if ratio is not None and ratio <= 2.0 else
                            f"each cached token costs {ratio:.0f}x what the attention term "
                            "(K/V read once) predicts: the step does slow down with the cache "
                            "beyond attention"))
    return out


def _elem(dtype: str) -> int:
    from feather_export.bench.perf_model import ELEMENT_BYTES
    return ELEMENT_BYTES[dtype]


# ---- statistics and the model --------------------------------------------------------------------

def stats(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    a = np.asarray(values)
    p10, q1, med, q3, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return {"n": len(a), "median": float(med), "p10": float(p10), "p90": float(p90),
            "q1": float(q1), "q3": float(q3), "min": float(a.min()), "max": float(a.max())}


def decode_tokens_per_s(steps: list[dict], g: int) -> float | None:
    """Tokens/s of a generation of g tokens: (g - 1) decode steps over their time (None for g=1
    or when the run stopped earlier)."""
    if g < 2 or len(steps) < g - 1:
        return None
    return (g - 1) / sum(s["seconds"] for s in steps[:g - 1])


def _roofline(costs, device, dtype):
    from feather_export.bench.perf_model import roofline_seconds
    return sum(roofline_seconds(c.cost, device, dtype) for c in costs)


def _fit_line(x, y):
    """Least-squares slope, intercept and the slope's standard error."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or np.ptp(x) == 0:
        return None
    A = np.vstack([x, np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    dof = max(len(x) - 2, 1)
    se = float(np.sqrt(resid @ resid / dof / ((x - x.mean()) ** 2).sum()))
    return float(coef[0]), float(coef[1]), se


def decode_scaling(target: Target, samples: list[dict], device, prompt_len: int) -> dict | None:
    """Per-step decode time against cache length, vs what the model's attention term explains.

    ok when the measured slope is within two standard errors of the predicted slope, or when the
    excess slowdown over the measured range is under 5% of the median step time.
    """
    from feather_export.bench.perf_model import decode_costs

    points = [(s["past"], s["seconds"]) for smp in samples for s in smp["steps"]]
    if len(points) < MIN_SLOPE_POINTS:
        return None
    past, secs = zip(*points)
    lo, hi = min(past), max(past)
    pred = {p: _roofline(decode_costs(target.shape, target.prune, p, target.dtype, target.weights), device,
                         target.dtype) for p in sorted(set(past))}
    span = max(hi - lo, 1)
    pred_slope = (_roofline(decode_costs(target.shape, target.prune, lo + span, target.dtype,
                                         target.weights),
                            device, target.dtype) - pred[lo]) / span
    fit = _fit_line(past, secs)
    median_step = float(np.median(secs))
    out = {"cache_min": int(lo), "cache_max": int(hi), "steps": len(points),
           "median_step_s": median_step, "predicted_step_s_at_min": pred[lo],
           "predicted_step_s_at_max": pred[hi], "predicted_slope_s_per_token": pred_slope,
           "per_cache_length": [{"past": p, **stats([s for q, s in points if q == p]),
                                 "predicted_s": pred[p]} for p in sorted(set(past))]}
    if fit is None:
        out.update(measured_slope_s_per_token=None, ok=None,
                   verdict="one cache length only: generate more tokens to test the slope")
        return out
    slope, intercept, se = fit
    excess = (slope - pred_slope) * (hi - lo) / median_step
    ok = bool(slope <= pred_slope + 2 * se or excess <= 0.05)
    out.update(measured_slope_s_per_token=slope, slope_stderr=se, intercept_s=intercept,
               growth_over_range_s=slope * (hi - lo),
               predicted_growth_over_range_s=pred_slope * (hi - lo),
               excess_growth_fraction=excess, ok=ok,
               verdict=("ok: step time grows no faster than attention over the longer cache "
                        "explains" if ok else
                        f"slower than the model explains: +{excess * 100:.1f}% of a step over "
                        f"{hi - lo} tokens beyond the attention term"))
    return out


def prediction_curves(shape, methods, text_tokens: int, dtype: str, device) -> dict:
    """Predicted prefill FLOPs and roofline time per budget for each method (default schedules)."""
    from feather_export.models.geometry import ModelGeometry
    from feather_export.methods.config import PruneConfig
    from feather_export.bench.perf_model import prefill_costs, total

    geo = ModelGeometry(shape.llm.layers, shape.num_image_tokens, shape.grid_side)
    base = prefill_costs(shape, None, text_tokens, dtype)
    base_flops, base_time = total(base).flops, _roofline(base, device, dtype)
    n = shape.num_image_tokens
    budgets = sorted({max(1, round(n * i / CURVE_POINTS)) for i in range(1, CURVE_POINTS + 1)})
    curves = {}
    for method in methods:
        if method == "none":
            continue
        points = []
        for b in budgets:
            try:
                cfg = PruneConfig.create(method, geo, budget=b)
            except FeatherError:
                continue
            costs = prefill_costs(shape, cfg, text_tokens, dtype)
            flops, secs = total(costs).flops, _roofline(costs, device, dtype)
            points.append({"budget": b, "flops": flops, "roofline_s": secs,
                           "flops_speedup": base_flops / flops, "roofline_speedup": base_time / secs})
        curves[method] = points
    return {"none": {"budget": n, "flops": base_flops, "roofline_s": base_time}, "methods": curves}


def _row(target, name, kind, values, costs=None, device=None, **extra) -> dict:
    from feather_export.bench.perf_model import total

    s = stats(values)
    row = {"target": target.label, "row": name, "kind": kind,
           **({k: s[k] for k in ("n", "median", "p10", "p90", "q1", "q3")} if s else {"n": 0})}
    if costs is not None:
        c = total(costs)
        row["flops"], row["bytes"] = c.flops, c.bytes
        row["predicted_s"] = _roofline(costs, device, target.dtype)
        row["ratio"] = s["median"] / row["predicted_s"] if s and row["predicted_s"] else None
    row.update(extra)
    return row


def _paired(samples_a, samples_b, fn):
    """Per-repeat ratios fn(a) / fn(b) for measured (non-warm-up) runs of two targets."""
    by_rep = {s["repeat"]: s for s in samples_b}
    out = []
    for s in samples_a:
        other = by_rep.get(s["repeat"])
        if other is not None:
            num, den = fn(s), fn(other)
            if num is not None and den:
                out.append(num / den)
    return out


def summarize(targets: list[Target], samples: list[dict], device, prompt_len: int,
              gen_lengths) -> dict:
    """Rows (measured vs predicted, speed-ups vs ``none``), decode scaling and headline figures."""
    from feather_export.bench.perf_model import decode_costs, prefill_costs, total

    text_tokens = prompt_len - targets[0].shape.num_image_tokens
    measured = {t.label: [s for s in samples if s["target"] == t.label and not s["warmup"]]
                for t in targets}
    ref = next((t for t in targets if t.label == "none"),
               next((t for t in targets if t.method == "none"), None))
    rows, per_target = [], {}
    ref_costs = (prefill_costs(ref.shape, ref.prune, text_tokens, ref.dtype, ref.weights)
                 if ref else None)
    for t in targets:
        runs = measured[t.label]
        costs = prefill_costs(t.shape, t.prune, text_tokens, t.dtype, t.weights)
        for c in costs:
            rows.append(_row(t, c.name, c.kind, [s["timings"].get(c.name) for s in runs], [c],
                             device, tokens=c.tokens))
        selects = [c for c in costs if c.kind == "select"]
        decoders = [c for c in costs if c.kind == "decoder"]
        if selects:
            rows.append(_row(t, "selection", "selection",
                             [s["timings"].get("selection") for s in runs], selects, device))
        llm_time = [sum(s["timings"].get(c.name, 0.0) for c in decoders) for s in runs]
        extra = {}
        if ref is not None and t is not ref:
            ref_dec = [c for c in ref_costs if c.kind == "decoder"]
            sp = _paired(measured[ref.label], runs,
                         lambda s: sum(s["timings"].get(c.name, 0.0) for c in
                                       (ref_dec if s["target"] == ref.label else decoders)))
            extra = _speedup_fields(sp, total(ref_dec).flops / total(decoders).flops,
                                    _roofline(ref_dec, device, t.dtype)
                                    / _roofline(decoders, device, t.dtype))
        rows.append(_row(t, "decoder spans (prefill)", "llm_prefill", llm_time, decoders, device,
                         **extra))
        extra = {}
        if ref is not None and t is not ref:
            sp = _paired(measured[ref.label], runs, lambda s: s["timings"]["ttft"])
            extra = _speedup_fields(sp, total(ref_costs).flops / total(costs).flops,
                                    _roofline(ref_costs, device, t.dtype)
                                    / _roofline(costs, device, t.dtype))
        ttft_row = _row(t, "ttft (prefill)", "ttft", [s["timings"]["ttft"] for s in runs], costs,
                        device, **extra)
        rows.append(ttft_row)
        share = [s["timings"].get("selection", 0.0) / s["timings"]["ttft"] for s in runs]
        sel_time = _roofline(selects, device, t.dtype) if selects else 0.0
        info = {"selection_share": stats(share) if selects else None,
                "selection_share_predicted": (sel_time / ttft_row["predicted_s"]) if selects
                else None,
                "selection_flops_share": (total(selects).flops / total(costs).flops) if selects
                else None}
        decode_rates = {}
        for g in gen_lengths:
            if g < 2:
                continue
            rates = [decode_tokens_per_s(s["steps"], g) for s in runs]
            reached = sum(r is not None for r in rates)
            if reached < MIN_DECODE_SAMPLES:
                rows.append({"target": t.label, "row": f"decode tok/s @{g}", "kind": "decode_rate",
                             "n": reached, "gen_length": g, "not_measured": (
                                 f"{reached} of {len(runs)} runs reached {g} tokens (the model "
                                 "stopped at end-of-sequence); bench --ignore-eos measures decode "
                                 "past it")})
                continue
            mean_past = prompt_len + (g - 1) / 2
            step_costs = decode_costs(t.shape, t.prune, int(mean_past), t.dtype, t.weights)
            extra = {}
            if ref is not None and t is not ref:
                sp = _paired(runs, measured[ref.label],
                             lambda s, g=g: decode_tokens_per_s(s["steps"], g))
                ref_step = decode_costs(ref.shape, ref.prune, int(mean_past), ref.dtype,
                                        ref.weights)
                extra = _speedup_fields(sp, total(ref_step).flops / total(step_costs).flops,
                                        _roofline(ref_step, device, t.dtype)
                                        / _roofline(step_costs, device, t.dtype))
            row = _row(t, f"decode tok/s @{g}", "decode_rate", rates, None, None,
                       gen_length=g, **extra)
            pred_step = _roofline(step_costs, device, t.dtype)
            row["flops"], row["bytes"] = total(step_costs).flops, total(step_costs).bytes
            row["predicted_tokens_per_s"] = 1.0 / pred_step
            row["ratio"] = (1.0 / row["median"]) / pred_step if row.get("median") else None
            rows.append(row)
            if row.get("median"):
                decode_rates[g] = row["median"]
        info["decode_tokens_per_s"] = decode_rates
        info["decode_scaling"] = decode_scaling(t, runs, device, prompt_len)
        info["runtime_decode_tokens_per_s"] = stats(
            [s["timings"].get("decode_tokens_per_s") for s in runs
             if s["timings"].get("decode_tokens_per_s")])
        per_target[t.label] = info
    curves = prediction_curves(targets[0].shape, sorted({t.method for t in targets}),
                               text_tokens, targets[0].dtype, device)
    return {"rows": rows, "per_target": per_target, "curves": curves,
            "headline": _headline(targets, rows, per_target, ref)}


def _speedup_fields(paired: list[float], flops_pred: float, roofline_pred: float) -> dict:
    s = stats(paired)
    out = {"flops_speedup": flops_pred, "roofline_speedup": roofline_pred}
    if s:
        out.update(speedup=s["median"], speedup_p10=s["p10"], speedup_p90=s["p90"],
                   speedup_vs_flops_prediction=s["median"] / flops_pred,
                   speedup_vs_roofline_prediction=s["median"] / roofline_pred)
    return out


def _headline(targets, rows, per_target, ref) -> dict:
    def row(label, name):
        return next(r for r in rows if r["target"] == label and r["row"] == name)

    out = {"none_ttft_s": row(ref.label, "ttft (prefill)").get("median") if ref else None,
           "results": []}
    for t in targets:
        if t is ref:
            continue
        r = row(t.label, "ttft (prefill)")
        share = per_target[t.label]["selection_share"]
        scaling = per_target[t.label]["decode_scaling"]
        out["results"].append({
            "target": t.label, "ttft_s": r.get("median"), "ttft_speedup": r.get("speedup"),
            "ttft_speedup_p10": r.get("speedup_p10"), "ttft_speedup_p90": r.get("speedup_p90"),
            "flops_predicted_speedup": r.get("flops_speedup"),
            "speedup_vs_flops_prediction": r.get("speedup_vs_flops_prediction"),
            "roofline_predicted_speedup": r.get("roofline_speedup"),
            "ttft_measured_over_roofline": r.get("ratio"),
            "selection_share_of_prefill": share["median"] if share else None,
            "decode_tokens_per_s": per_target[t.label]["decode_tokens_per_s"],
            "decode_scaling_ok": scaling.get("ok") if scaling else None})
    return out


def build_report(targets, samples, device, machine, options: BenchOptions, prompt_len: int,
                 backend_name: str, command: list[str] | None = None,
                 sweeps: dict | None = None) -> dict:
    summary = summarize(targets, samples, device, prompt_len, options.gen_lengths)
    for t in targets:
        if sweeps and t.label in sweeps:
            sw = summarize_sweep(t, sweeps[t.label], device)
            sw["spans"] = sweeps[t.label]["spans"]
            summary["per_target"][t.label]["cache_sweep"] = sw
            for r in summary["headline"]["results"]:
                if r["target"] == t.label and sw.get("ok") is not None:
                    r["decode_cache_cost_over_attention_term"] = sw["slope_over_attention_term"]
                    r["decode_scaling_ok"] = bool(r.get("decode_scaling_ok") and sw["ok"])
    t0 = targets[0]
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else list(sys.argv),
        "model": t0.model_id, "dtype": t0.dtype, "backend": backend_name,
        "prompt_tokens": prompt_len, "text_tokens": prompt_len - t0.shape.num_image_tokens,
        "shape": _shape_dict(t0.shape),
        "options": {"repeats": options.repeats, "warmup": options.warmup,
                    "gen_lengths": list(options.gen_lengths), "prompt": options.prompt,
                    "seed": options.seed, "device": options.device, "verify": options.verify,
                    "threads": options.threads, "ort_config": dict(options.ort_config),
                    "cache_sweep": list(options.cache_sweep)},
        "machine": machine, "device": device.to_dict(),
        "contention": _contention(samples),
        "targets": [t.to_dict() for t in targets],
        **summary,
        "samples": samples,
    }


def _contention(samples: list[dict]) -> dict:
    """Load average and this process's CPU use per wall second during the measured runs: other
    work on the machine shows as a load average above the cores in use and a lower CPU use."""
    runs = [s for s in samples if not s.get("warmup") and s.get("wall_s")]
    return {"loadavg_1m": stats([s.get("loadavg_1m") for s in runs]),
            "process_cpu_per_wall_s": stats([s["process_cpu_s"] / s["wall_s"] for s in runs]),
            "cpus": os.cpu_count()}


def _shape_dict(shape) -> dict:
    from dataclasses import asdict
    return asdict(shape)


def headline_line(report: dict, json_path: str | None = None) -> dict:
    """The one-line JSON summary printed last."""
    return {"bench": SCHEMA, "model": report["model"], "backend": report["backend"],
            "dtype": report["dtype"], "device": report["device"]["name"],
            **report["headline"], "json": json_path}

