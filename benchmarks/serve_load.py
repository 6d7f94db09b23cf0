#!/usr/bin/env python
"""Closed-loop load on `feather-export serve`: throughput, p50/p95/p99 latency and TTFT, errors.

With --artifact it starts a local Ray Serve application itself and measures each --replicas
setting in turn, interleaved over --rounds (1, 2, 1, 2, ...), so drift on a shared machine hits
every setting alike; with --url it loads a server that is already running.

    python benchmarks/serve_load.py --artifact art --replicas 1,2 --concurrency 4 --duration 20 \\
        --results benchmarks/results/serve_tiny_shapes
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --results /tmp/r

Writes serve_load.json (settings, every sample, summaries), serve_load.png and COMMAND.txt.
The last line printed is one JSON object with the headline figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--artifact", help="start a local server on this artifact")
    where.add_argument("--url", help="load this running server instead")
    p.add_argument("--replicas", default="1,2", help="replica counts to measure (default 1,2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds over --replicas (default 2)")
    p.add_argument("--concurrency", type=int, default=4, help="closed-loop clients (default 4)")
    p.add_argument("--duration", type=float, default=20.0,
                   help="seconds per measurement (default 20; 0 with --requests: count only)")
    p.add_argument("--requests", type=int, help="requests per measurement (default: no limit)")
    p.add_argument("--warmup", type=int, default=4, help="requests before each measurement "
                   "(default 4)")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens per request (default 16)")
    p.add_argument("--image", default=str(REPO / "examples" / "shapes.png"),
                   help="PNG sent with every request (default examples/shapes.png)")
    p.add_argument("--question", default="Where is the red square?")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="with --artifact (default 1)")
    p.add_argument("--port", type=int, default=8000, help="with --artifact (default 8000)")
    p.add_argument("--results", required=True, help="directory for the JSON, plot and command")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    return p.parse_args(argv)


def _model_name(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=30) as r:
        return json.loads(r.read())["data"][0]["id"]


def replica_rss_mib() -> list[float]:
    """Resident memory of each model replica process on this machine (Linux /proc; [] elsewhere)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::ServeReplica:feather:FeatherModel"):
                continue
            status = (proc / "status").read_text()
        except OSError:
            continue
        rss = [line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")]
        found += [int(rss[0]) / 1024] if rss else []
    return sorted(found)


def measure(url: str, args, label: str) -> dict:
    from feather_export.serve.loadgen import LoadConfig, run_load, samples_json, summarize

    model = _model_name(url)
    common = dict(url=url, model=model, image=Path(args.image), question=args.question,
                  max_tokens=args.max_tokens, concurrency=args.concurrency)
    if args.warmup:
        run_load(LoadConfig(**{**common, "concurrency": min(args.concurrency, args.warmup)},
                            duration=None, requests=args.warmup))
    config = LoadConfig(**common, duration=args.duration or None, requests=args.requests)
    samples = run_load(config)
    summary = summarize(samples)
    print(f"{label}: {summary['ok']}/{summary['requests']} ok, "
          f"{summary['throughput_rps']:.1f} req/s, latency p50 "
          f"{summary['latency_s'].get('p50', float('nan')) * 1e3:.0f} ms p99 "
          f"{summary['latency_s'].get('p99', float('nan')) * 1e3:.0f} ms, TTFT p50 "
          f"{summary['ttft_s'].get('p50', float('nan')) * 1e3:.0f} ms", file=sys.stderr, flush=True)
    return {"label": label, "summary": summary, "replica_rss_mib": replica_rss_mib(),
            "samples": samples_json(samples)}


def run(args) -> dict:
    runs = []
    if args.url:
        runs.append(measure(args.url, args, "server"))
        return {"runs": runs}
    from feather_export.serve.app import ServeConfig, start, stop

    counts = [int(c) for c in args.replicas.split(",")]
    try:
        for rnd in range(args.rounds):
            for n in counts:
                config = ServeConfig(artifact=Path(args.artifact), replicas=n, port=args.port,
                                     cpus_per_replica=args.cpus_per_replica)
                t0 = time.perf_counter()
                print(f"round {rnd + 1}: deploying {n} replica(s)", file=sys.stderr, flush=True)
                start(config, ray_init_kwargs={"log_to_driver": False})
                result = measure(f"http://127.0.0.1:{args.port}", args, f"{n} replica(s)")
                result.update(replicas=n, round=rnd, deploy_s=time.perf_counter() - t0)
                runs.append(result)
    finally:
        stop(local=True)
    by_count = {}
    for n in counts:
        mine = [r["summary"] for r in runs if r["replicas"] == n]
        by_count[n] = {"throughput_rps": [s["throughput_rps"] for s in mine],
                       "latency_p50_s": [s["latency_s"].get("p50") for s in mine],
                       "ttft_p50_s": [s["ttft_s"].get("p50") for s in mine],
                       "errors": sum(s["errors"] for s in mine)}
    result = {"runs": runs, "by_replicas": by_count}
    if len(counts) > 1:
        base = sum(by_count[counts[0]]["throughput_rps"]) / args.rounds
        result["throughput_vs_first"] = {n: sum(v["throughput_rps"]) / args.rounds / base
                                         for n, v in by_count.items()}
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in report["runs"]:
        lat = np.sort([s["latency"] for s in r["samples"] if s["latency"] is not None]) * 1e3
        ttft = np.sort([s["ttft"] for s in r["samples"] if s["ttft"] is not None]) * 1e3
        name = r["label"] + (f", round {r['round'] + 1}" if "round" in r else "")
        line, = ax1.plot(lat, np.linspace(0, 1, len(lat)), label=f"{name}: latency")
        ax1.plot(ttft, np.linspace(0, 1, len(ttft)), "--", color=line.get_color(),
                 label=f"{name}: TTFT")
    ax1.set_xlabel("ms")
    ax1.set_ylabel("fraction of requests")
    ax1.set_title("latency and TTFT (CDF)")
    ax1.legend(fontsize=7)
    labels = [r["label"] + (f" r{r['round'] + 1}" if "round" in r else "") for r in report["runs"]]
    ax2.bar(labels, [r["summary"]["throughput_rps"] for r in report["runs"]])
    ax2.set_ylabel("requests/s")
    ax2.set_title(f"throughput, {report['settings']['concurrency']} closed-loop clients")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    report["settings"] = {k: v for k, v in vars(args).items() if k != "results"}
    report["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                         "python": platform.python_version(), "note": args.note}
    command = "python benchmarks/serve_load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    report["command"] = command
    (out / "serve_load.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "COMMAND.txt").write_text(command + "\n")
    plot(report, out / "serve_load.png")
    head = {r["label"] + (f" r{r['round'] + 1}" if "round" in r else ""):
            {**{k: r["summary"][k] for k in ("throughput_rps", "latency_s", "ttft_s", "errors")},
             "replica_rss_mib": r["replica_rss_mib"]}
            for r in report["runs"]}
    print(json.dumps({"results": str(out), **head,
                      "throughput_vs_first": report.get("throughput_vs_first")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
