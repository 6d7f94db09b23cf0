#!/usr/bin/env python
"""Which model / weight format / budget fits which Jetson: stored artifact bytes + KV caches.

Artifact bytes come from the performance model's stored-width count (the same count the roofline
uses; for shape-llava-1b it is checked against measured artifact sizes in
benchmarks/results/cpu_1b_weights), vision tower + projector + embeddings in the float dtype.
KV caches are the runtime's preallocated buffers at the artifact's limits: every layer holds
image tokens + --max-text-tokens + --max-new-tokens rows; with FEATHER, layers from K1 on hold
B1 instead of N image rows and layers from K2 on hold B2 (default schedule). A fixed reserve
(--reserve-gib, default 2.5: JetPack, CUDA context, TensorRT activations/workspace) is an
assumption, not a measurement.

    python benchmarks/jetson_fit.py --out benchmarks/results/jetson_fit.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB = 2 ** 30
JETSONS = {"Orin Nano 8GB": 8, "Orin NX 16GB": 16, "AGX Orin 32GB": 32, "AGX Orin 64GB": 64}
MODELS = ("shape-llava-1b", "shape-llava-1.5-7b", "shape-llava-1.5-13b")


def artifact_bytes(shape, weights: str, elem: int) -> float:
    from feather_export.bench.perf_model import WeightFormat, span_cost

    llm = shape.llm
    decoder = span_cost(llm, llm.layers, 0, 0, True, elem, weights=WeightFormat(weights)).bytes
    return decoder + llm.vocab * llm.hidden * elem + shape.vision.params() * elem


def kv_bytes(shape, budget: int | None, elem: int, text: int, new: int) -> float:
    llm = shape.llm
    n = shape.num_image_tokens
    rows = []
    if budget is None:
        rows = [n] * llm.layers
    else:
        k1, k2 = max(1, llm.layers // 4), max(max(1, llm.layers // 4) + 1, llm.layers // 2)
        b2 = max(1, int(0.09 * budget + 0.5))
        rows = [n if i < k1 else budget if i < k2 else b2 for i in range(llm.layers)]
    return sum(2 * llm.kv_dim * (r + text + new) * elem for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--max-text-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--reserve-gib", type=float, default=2.5)
    p.add_argument("--out")
    args = p.parse_args(argv)

    from feather_export.bench.perf_model import ELEMENT_BYTES, shape_from_config
    from feather_export.models.shapes import shape_llava_config

    elem = ELEMENT_BYTES[args.dtype]
    rows = []
    for name in MODELS:
        shape = shape_from_config(shape_llava_config(name))
        for weights in ("float", "int8", "int4"):
            art = artifact_bytes(shape, weights, elem)
            for budget in (None, 144):
                kv = kv_bytes(shape, budget, elem, args.max_text_tokens, args.max_new_tokens)
                need = (art + kv) / GIB + args.reserve_gib
                rows.append({"model": name, "weights": weights if weights != "float" else args.dtype,
                             "method": "none" if budget is None else "feather@144",
                             "artifact_gib": round(art / GIB, 2), "kv_gib": round(kv / GIB, 2),
                             "needs_gib": round(need, 2),
                             "fits": [j for j, mem in JETSONS.items() if need <= mem]})
    result = {"command": "python benchmarks/jetson_fit.py " + " ".join(argv or sys.argv[1:]),
              "dtype": args.dtype, "max_text_tokens": args.max_text_tokens,
              "max_new_tokens": args.max_new_tokens, "reserve_gib": args.reserve_gib,
              "note": "artifact bytes from the perf model's stored-width count (decoder linears at "
                      "the weight format, everything else float); reserve is an assumption",
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("| model | weights | method | artifact GiB | KV GiB | needs GiB | fits |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['weights']} | {r['method']} | {r['artifact_gib']} | "
              f"{r['kv_gib']} | {r['needs_gib']} | {', '.join(r['fits']) or 'none'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
