#!/usr/bin/env python
"""Quality of weight-only int8/int4 on the trained tiny-shapes model, next to float (fp32).

For `none` and FEATHER@64, exports float, int8 and int4 artifacts and answers the same test
samples through feather_runtime (ONNX Runtime CPU): accuracy (the `feather-export eval` scoring),
token agreement with the float artifact of the same method, and the max |logit - float logit| of
the first generated position.

    python benchmarks/quality_weights.py --n 300 --out benchmarks/results/quality_weights
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="test samples (default 300)")
    p.add_argument("--out", default="benchmarks/results/quality_weights")
    p.add_argument("--block-size", type=int, default=128)
    args = p.parse_args(argv)

    from feather_export.export.artifact import ExportOptions, export
    from feather_export.models.checkpoint import check_checkpoint_dir, checkpoint_path
    from feather_export.quality.evaluate import _load_pipeline, is_correct
    from feather_export.quality.synthetic import make_samples

    model_dir = check_checkpoint_dir(checkpoint_path("tiny-shapes"))
    samples = make_samples("test", args.n, seed=0)
    images = [s.image() for s in samples]
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        for method, budget in (("none", None), ("feather", 64)):
            ref = None
            for weights in ("float", "int8", "int4"):
                art = export(model_dir, Path(work) / f"{method}-{weights}",
                             ExportOptions(method=method, budget=budget, max_text_tokens=64,
                                           max_new_tokens=4, weights=weights,
                                           block_size=args.block_size), progress=lambda m: None)
                size = sum(f.stat().st_size for f in (art / "onnx").iterdir())
                pipe = _load_pipeline(art, 1)
                preds = [pipe.generate(image=img, prompt=s.question, max_new_tokens=4)
                         for s, img in zip(samples, images)]
                pipe.close()
                correct = [is_correct(s, r.text) for s, r in zip(samples, preds)]
                row = {"method": method, "budget": budget, "weights": weights,
                       "onnx_bytes": size, "accuracy": float(np.mean(correct))}
                if ref is None:
                    ref = preds
                else:
                    row["tokens_equal_float"] = float(np.mean(
                        [a.token_ids == b.token_ids for a, b in zip(preds, ref)]))
                    row["max_abs_logit_error_vs_float"] = float(max(
                        np.abs(a.first_logits - b.first_logits).max() for a, b in zip(preds, ref)))
                    row["logit_range_float"] = float(max(np.ptp(b.first_logits) for b in ref))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/quality_weights.py " + " ".join(argv or sys.argv[1:]),
              "model": "tiny-shapes", "split": "test", "n": args.n, "block_size": args.block_size,
              "backend": "onnxruntime-cpu (MatMulNBits, accuracy level 4)",
              "seconds": time.perf_counter() - t0, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
