#!/usr/bin/env python
"""CPU peer benchmark: our runtime vs transformers (sdpa, fp32) vs OpenVINO GenAI on shape-llava-1b.

Same model (deterministic random weights), same 336x336 image, same prompt as benchmarks/cpu_1b.py
(593 tokens: 576 image + 17 text), 16 new tokens, greedy, EOS ignored. Each engine runs in its own
worker process (benchmarks/peers/worker.py), so peak RSS is per engine and only one 1B model is in
memory at a time (the machine is a shared 2-core, 24 GiB one). Interleaving is per round: every
round loads each engine once, in an order rotated each round, runs one warm-up and --repeats-per-round
measured generations, and unloads it; medians are over all rounds. The 1-minute load average is
recorded with every run.

    # once: the OpenVINO venv (separate: optimum-intel needs transformers < 5.6)
    bash benchmarks/peers/setup_openvino.sh
    python benchmarks/peers/peers.py                       # ~30-40 min on 2 busy cores
    python benchmarks/peers/peers.py --engines ours-none,torch-sdpa --rounds 2

Engines: ours-none, ours-feather144 (feather_runtime, ONNX Runtime CPU; append -int8 for the
artifact with int8 decoder and lm_head weights, +BACKEND for another feather_runtime backend, e.g.
ours-feather144-int8+openvino-bf16), torch-sdpa, ov-fp32 (OpenVINO GenAI, fp32 forced:
INFERENCE_PRECISION_HINT=f32, KV_CACHE_PRECISION=f32), ov-default (OpenVINO's own defaults for this
CPU), ov-bf16 (bf16 asked for: INFERENCE_PRECISION_HINT=bf16), ov-int8 (optimum-intel's int8 weight
export, OpenVINO's defaults). Writes peers.json (every sample, machine, limits), table.md,
peers.png and COMMAND.txt to --results; the last line printed is one JSON object with the medians.
Installs nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MODEL = "shape-llava-1b"
PROMPT = "Describe the image in detail."       # benchmarks/cpu_1b.py's (bench's default) prompt
OV_FP32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
OV_BF16 = {"INFERENCE_PRECISION_HINT": "bf16"}     # asks for bf16 where the CPU has no AMX


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL,
                   help="shape model, or a checkpoint directory / tiny-shapes for a quick end-to-end "
                        "check of every engine (default: %(default)s)")
    p.add_argument("--engines", default="ours-none,ours-feather144,torch-sdpa,ov-fp32,ov-default",
                   help="comma list (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="load/run/unload rounds (default: 3)")
    p.add_argument("--repeats-per-round", type=int, default=2,
                   help="measured runs per engine per round, after one warm-up (default: 2)")
    p.add_argument("--new-tokens", type=int, default=16, help="default: 16")
    p.add_argument("--budget", type=int, default=144, help="FEATHER budget (default: 144)")
    p.add_argument("--threads", type=int, help="threads for every engine (default: each engine's own)")
    p.add_argument("--work", default="/tmp/feather-peers", help="models and artifacts (default: %(default)s)")
    p.add_argument("--results", default=str(REPO / "benchmarks/results/peers_cpu"),
                   help="default: benchmarks/results/peers_cpu")
    p.add_argument("--ov-python", default=str(REPO / ".venv-ov/bin/python"),
                   help="python of the OpenVINO venv (default: .venv-ov/bin/python)")
    p.add_argument("--ours-config", action="append", default=[], metavar="KEY=VALUE",
                   help="ONNX Runtime session config entry for our engines (repeatable; default none)")
    p.add_argument("--note", default="", help="free text stored in the JSON (default: empty)")
    p.add_argument("--keep-work", action="store_true", help="keep --work afterwards (default: removed)")
    return p.parse_args(argv)


# ---- preparation ---------------------------------------------------------------------------------

def prepare(work: Path, budget: int, new_tokens: int, need_ov: list[str], ov_python: str,
            model_name: str = MODEL, need_ours: tuple[str, ...] | None = None) -> dict:
    """The checkpoint, our artifacts and the OpenVINO export, each made once (reused if present)."""
    from feather_export.models.checkpoint import BUILTIN_CHECKPOINTS

    if model_name not in BUILTIN_CHECKPOINTS and not Path(model_name).is_dir():
        return _prepare_shape(work, budget, new_tokens, need_ov, ov_python, model_name, need_ours)
    src = BUILTIN_CHECKPOINTS.get(model_name, Path(model_name))
    paths = _prepare_checkpoint(work, src, budget, new_tokens, need_ours)
    return _prepare_ov(paths, work, need_ov, ov_python)


def _write_image(path: Path, size: int = 336) -> None:
    """A deterministic noise image at the model's input size: no engine resizes or crops it."""
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def artifact_options(key: str, budget: int, new_tokens: int):
    """Export options for one of our artifacts: ``none`` / ``feather<budget>``, and the same with
    ``-int8`` (decoder linear layers and lm_head as int8 weights, per output channel)."""
    from feather_export.export.artifact import ExportOptions

    base, _, suffix = key.partition("-")
    if base == "none":
        method = {"method": "none"}
    elif base == f"feather{budget}":
        method = {"method": "feather", "budget": budget}
    else:
        return None
    if suffix not in ("", "int8"):
        return None
    quant = {"weights": "int8", "lm_head_weights": "int8"} if suffix else {}
    return ExportOptions(max_text_tokens=64, max_new_tokens=new_tokens, **method, **quant)


def _our_artifacts(work: Path, budget: int, need_ours) -> dict:
    keys = need_ours if need_ours is not None else ("none", f"feather{budget}")
    return {k: work / k for k in keys}


def _prepare_checkpoint(work: Path, src: Path, budget: int, new_tokens: int, need_ours=None) -> dict:
    from feather_export.export.artifact import export

    ours = _our_artifacts(work, budget, need_ours)
    paths = {"hf": src, **ours, "image": work / "image.png"}
    if not paths["image"].is_file():
        config = json.loads((src / "config.json").read_text())
        _write_image(paths["image"], config["vision_config"]["image_size"])
    for key, path in ours.items():
        options = artifact_options(key, budget, new_tokens)
        if options is not None and not (path / "feather.json").is_file():
            export(str(src), path, options, progress=say)
    return paths


def _prepare_shape(work, budget, new_tokens, need_ov, ov_python, model_name, need_ours=None):
    ours = _our_artifacts(work, budget, need_ours)
    hf, paths = work / "hf", {"hf": work / "hf", **ours, "image": work / "image.png"}
    if not paths["image"].is_file():
        _write_image(paths["image"])
    todo = [k for k, path in ours.items() if not (path / "feather.json").is_file()
            and artifact_options(k, budget, new_tokens) is not None]
    if todo or not (hf / "config.json").is_file():
        from feather_export.export.shapes import export_shape_artifacts
        from feather_export.models.shapes import build_shape_model, shape_spec
        from feather_export.models.tokenizer import save_tiny_tokenizer
        from feather_runtime.preprocess import write_preprocessor_config

        model = build_shape_model(model_name, say)
        if not (hf / "config.json").is_file():
            say(f"saving the checkpoint to {hf}")
            model.save_pretrained(hf, safe_serialization=True)
            save_tiny_tokenizer(hf)
            write_preprocessor_config(hf, shape_spec(model_name).image_size)
        jobs = [(paths[k], artifact_options(k, budget, new_tokens)) for k in todo]
        del model                # the export streams the same weights tensor by tensor
        gc.collect()
        if jobs:
            export_shape_artifacts(model_name, jobs, progress=say)
    return _prepare_ov(paths, work, need_ov, ov_python)


def _prepare_ov(paths: dict, work: Path, need_ov: list[str], ov_python: str) -> dict:
    hf = paths["hf"]
    for name in need_ov:
        out = work / name
        paths[name] = out
        if (out / "openvino_language_model.xml").is_file():
            continue
        fmt = "int8" if name == "ov-int8" else "fp32"
        say(f"exporting {hf} to OpenVINO IR ({fmt}) with {ov_python}")
        rc = subprocess.call([ov_python, str(HERE / "export_openvino.py"), str(hf), str(out),
                              "--weight-format", fmt])
        if rc != 0:
            raise SystemExit(f"peers: the OpenVINO export failed (exit {rc}); see above")
    return paths


# ---- machine -------------------------------------------------------------------------------------

def cpu_flags() -> dict:
    flags = set()
    model = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
        elif line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
    keys = ["avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
            "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"]
    return {"cpu": model, "logical_cpus": os.cpu_count(), **{k: k in flags for k in keys}}


def machine_limits(threads: int | None) -> dict:
    """fp32 and bf16 GEMM GFLOP/s (torch, oneDNN/MKL) and read bandwidth (numpy sum), best of 3."""
    import numpy as np
    import torch

    from feather_export.bench.perf_model import _best_time

    def best(fn):
        return _best_time(fn, 3)

    if threads:
        torch.set_num_threads(threads)

    m, k, n = 576, 2048, 5632
    res = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        res[f"gemm_{name}_gflops"] = round(2 * m * k * n / best(lambda: a @ b) / 1e9, 1)
    big = np.ones(256 << 20, np.float32)          # 1 GiB, far beyond the caches
    res["read_gb_s"] = round(big.nbytes / best(lambda: big.sum()) / 1e9, 1)
    res["gemm_shape"] = [m, k, n]
    res["method"] = ("torch matmul (fp32, bf16), best of 3; read bandwidth = numpy sum over 1 GiB; "
                     f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return res


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


# ---- engines -------------------------------------------------------------------------------------

def engine_command(name: str, paths: dict, args) -> tuple[list[str], str]:
    threads = {"threads": args.threads} if args.threads else {}
    prompt = PROMPT
    if name.startswith("ours-"):
        cfg = dict(e.split("=", 1) for e in args.ours_config)
        key, _, backend = name[5:].partition("+")          # ours-none+openvino-bf16
        py, kind, path = sys.executable, "ours", paths[key]
        props = {**threads, "session_config": cfg, **({"backend": backend} if backend else {})}
    elif name == "torch-sdpa":
        py, kind, path, props = sys.executable, "torch", paths["hf"], threads
    elif name.startswith("ov-"):
        from feather_runtime.prompt import format_prompt

        props = {**threads, **(OV_FP32 if name == "ov-fp32" else OV_BF16 if name == "ov-bf16" else {})}
        src = "ov-int8" if name == "ov-int8" else "ov-fp32"
        py, kind, path = args.ov_python, "openvino", paths[src]
        prompt = format_prompt(PROMPT, "<ov_genai_image_0>")
    else:
        raise SystemExit(f"peers: unknown engine {name!r}")
    cmd = [py, str(HERE / "worker.py"), kind, str(path), "--image", str(paths["image"]),
           "--prompt", prompt, "--new-tokens", str(args.new_tokens), "--props", json.dumps(props)]
    return cmd, kind


def run_block(name: str, cmd: list[str], rnd: int, repeats: int, env: dict) -> tuple[list, dict]:
    """Load one engine, one warm-up + ``repeats`` runs, unload; returns the samples and its info."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, cwd=str(REPO))

    def ask(line: str | None) -> dict:
        if line is not None:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
        out = proc.stdout.readline()
        if not out:
            proc.wait()
            raise SystemExit(f"peers: {name} worker ended (exit {proc.returncode}); see above")
        return json.loads(out)

    ready = ask(None)
    say(f"  {name}: loaded in {ready['load_s']:.1f} s")
    samples = []
    for i in range(repeats + 1):
        la = loadavg()
        t0 = time.perf_counter()
        out = ask("run")
        out.update(engine=name, round=rnd, warmup=i == 0, loadavg_before=la, loadavg_after=loadavg(),
                   wall_s=time.perf_counter() - t0)
        samples.append(out)
        say(f"  {name:<16} round {rnd} {'warm-up' if i == 0 else f'run {i}':<8} ttft "
            f"{out['ttft_s']:7.3f} s  decode {out['decode_tok_s']:6.2f} tok/s  "
            f"load {la[0]:.1f}")
    done = ask("quit")
    proc.wait()
    info = {**ready["info"], "load_s": ready["load_s"], "peak_rss_gib": done["peak_rss_gib"]}
    return samples, info


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if not n else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))] if xs else None


def summarize(engines, samples, infos) -> dict:
    measured = [s for s in samples if not s["warmup"]]
    ref_tokens = next((s["tokens"] for s in measured if s["engine"] == "torch-sdpa"), None)
    out = {}
    for e in engines:
        runs = [s for s in measured if s["engine"] == e]
        if not runs:
            continue
        ttft = [s["ttft_s"] for s in runs]
        tps = [s["decode_tok_s"] for s in runs]
        tokens = runs[0]["tokens"]
        row = {"runs": len(runs), "ttft_s": median(ttft), "ttft_p10": pct(ttft, .1),
               "ttft_p90": pct(ttft, .9), "decode_tok_s": median(tps), "decode_p10": pct(tps, .1),
               "decode_p90": pct(tps, .9),
               "peak_rss_gib": max(i["peak_rss_gib"] for i in infos[e]),
               "tokens": tokens, "same_tokens_every_run": all(s["tokens"] == tokens for s in runs),
               "loadavg_1m_median": median([s["loadavg_before"][0] for s in runs])}
        if ref_tokens is not None:
            agree = 0
            for a, b in zip(tokens, ref_tokens):
                if a != b:
                    break
                agree += 1
            row["tokens_equal_torch"] = tokens == ref_tokens
            row["tokens_common_prefix_with_torch"] = agree
        segs = [s["segments_s"] for s in runs if s.get("segments_s")]
        if segs:
            row["segments_s"] = {k: median([s[k] for s in segs]) for k in segs[0]}
        if "prompt_tokens" in runs[0]:
            row["prompt_tokens"] = runs[0]["prompt_tokens"]
        elif "prompt_tokens" in infos[e][0]:
            row["prompt_tokens"] = infos[e][0]["prompt_tokens"]
        out[e] = row
    return out


def table(summary: dict) -> str:
    lines = ["| engine | TTFT s (median, p10-p90) | decode tok/s (median, p10-p90) | peak RSS GiB | "
             "prompt tokens | tokens = torch |", "|---|---|---|---|---|---|"]
    for e, r in summary.items():
        eq = r.get("tokens_equal_torch")
        eq_s = "-" if eq is None else ("yes" if eq else f"no ({r['tokens_common_prefix_with_torch']} of "
                                       f"{len(r['tokens'])} first agree)")
        lines.append(f"| {e} | {r['ttft_s']:.2f} ({r['ttft_p10']:.2f}-{r['ttft_p90']:.2f}) | "
                     f"{r['decode_tok_s']:.2f} ({r['decode_p10']:.2f}-{r['decode_p90']:.2f}) | "
                     f"{r['peak_rss_gib']:.1f} | {r.get('prompt_tokens', '-')} | {eq_s} |")
    return "\n".join(lines) + "\n"


def cpu_flag_names(machine: dict) -> str:
    """The fast-unit flags a machine record has, for titles: e.g. "avx512f, avx512_bf16"."""
    return ", ".join(k for k in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                     if machine[k]) or "no AVX-512"


def plot_title(report: dict) -> str:
    """The plot's title from a peers.json report: model, prompt, CPU and its flags, load."""
    machine, summary = report["machine"], report["summary"]
    flags = cpu_flag_names(machine)
    tokens = next(iter(summary.values()), {}).get("prompt_tokens", "?")
    load = median([s["loadavg_before"][0] for s in report["samples"]])
    return (f"{report['model']}, {tokens}-token prompt, {report['new_tokens']} new tokens; "
            f"{machine['cpu']} ({flags}); load {load:.1f}")


def plot(summary: dict, path: Path, title: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib missing: no plot (pip install 'feather-export[bench]')")
        return
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.45 * len(names)), sharey=True)
    for ax, key, lo, hi, label in ((axes[0], "ttft_s", "ttft_p10", "ttft_p90", "TTFT (s, lower is better)"),
                                   (axes[1], "decode_tok_s", "decode_p10", "decode_p90",
                                    "decode tokens/s (higher is better)")):
        vals = [summary[n][key] for n in names]
        err = [[v - summary[n][lo] for v, n in zip(vals, names)],
               [summary[n][hi] - v for v, n in zip(vals, names)]]
        ax.barh(names, vals, xerr=err, capsize=3, color=["C0" if n.startswith("ours") else "C1"
                                                         if n.startswith("torch") else "C2"
                                                         for n in names])
        ax.set_title(label)
        for y, (v, n) in enumerate(zip(vals, names)):           # the median, right of the p90
            ax.text(summary[n][hi], y, f"  {v:.2f}", va="center", fontsize=8)
        ax.margins(x=0.15)
    axes[0].invert_yaxis()                 # (shared) first engine on top
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    need_ov = sorted({"ov-int8" if e == "ov-int8" else "ov-fp32" for e in engines if e.startswith("ov-")})
    if need_ov and not Path(args.ov_python).is_file():
        say(f"peers: {args.ov_python} missing: run bash benchmarks/peers/setup_openvino.sh "
            "(or leave the ov-* engines out)")
        return 2
    work, results = Path(args.work), Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    need_ours = tuple(dict.fromkeys(e[5:].partition("+")[0] for e in engines
                                    if e.startswith("ours-")))
    for e in engines:
        key = e[5:].partition("+")[0]
        if e.startswith("ours-") and artifact_options(key, args.budget, args.new_tokens) is None:
            say(f"peers: unknown engine {e!r} (ours-none, ours-feather{args.budget}, with -int8, "
                "+BACKEND)")
            return 2
    paths = prepare(work, args.budget, args.new_tokens, need_ov, args.ov_python, args.model, need_ours)
    machine = {**cpu_flags(), "loadavg_at_start": loadavg()}
    say("measuring the machine's limits")
    machine["limits"] = machine_limits(args.threads)
    say(json.dumps(machine))
    env = dict(os.environ)
    samples, infos = [], {e: [] for e in engines}
    for rnd in range(args.rounds):
        order = engines[rnd % len(engines):] + engines[:rnd % len(engines)]
        say(f"round {rnd + 1}/{args.rounds}: {', '.join(order)}")
        for e in order:
            cmd, _ = engine_command(e, paths, args)
            s, info = run_block(e, cmd, rnd, args.repeats_per_round, env)
            samples += s
            infos[e].append(info)
    summary = summarize(engines, samples, infos)
    machine["loadavg_at_end"] = loadavg()
    loads = [s["loadavg_before"][0] for s in samples]
    note = (f"shared 2-core machine: 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
            f"(median {median(loads):.1f}) during the runs; absolute times are pessimistic, "
            "compare engines within this run. " + args.note).strip()
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
              "prompt": PROMPT, "new_tokens": args.new_tokens, "budget": args.budget,
              "engines": engines, "rounds": args.rounds, "repeats_per_round": args.repeats_per_round,
              "threads": args.threads or "engine default", "ours_session_config": args.ours_config,
              "machine": machine, "engine_info": infos, "summary": summary, "samples": samples,
              "note": note}
    (results / "peers.json").write_text(json.dumps(report, indent=1))
    text = table(summary)
    lim = machine["limits"]
    flags = cpu_flag_names(machine)
    header = (f"{machine['cpu']}, {machine['logical_cpus']} CPUs ({flags}); fp32 GEMM "
              f"{lim['gemm_fp32_gflops']} GFLOP/s, bf16 GEMM {lim['gemm_bf16_gflops']} GFLOP/s, read "
              f"{lim['read_gb_s']} GB/s. {note}\n\n")
    (results / "table.md").write_text(header + text)
    plot(summary, results / "peers.png", plot_title(report))
    (results / "COMMAND.txt").write_text(
        "# made by (from the repository root, project venv active; OpenVINO venv from "
        "benchmarks/peers/setup_openvino.sh):\n"
        f"python benchmarks/peers/peers.py {shlex.join(argv if argv is not None else sys.argv[1:])}\n"
        f"# {report['created']}, wall {time.perf_counter() - t_start:.0f} s\n")
    print(header + text)
    if not args.keep_work:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({e: {k: r[k] for k in ("ttft_s", "decode_tok_s", "peak_rss_gib")}
                      for e, r in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
