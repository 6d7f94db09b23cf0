#!/usr/bin/env python
"""The OpenVINO backend's accuracy guard: trained tiny-shapes answers per backend vs ONNX Runtime fp32.

Exports tiny-shapes with `none` and FEATHER@64, each with float weights and with int8 weights
(decoder linear layers and lm_head, `--weights int8 --lm-head-weights int8`), answers --n held-out
test questions through ONNX Runtime CPU (fp32), OpenVINO bf16 and OpenVINO f32, and reports per
artifact and backend how often the answer equals ONNX Runtime's on the float artifact and how often
it is correct. Writes --results/openvino_accuracy.json.

    python benchmarks/openvino_accuracy.py            # 300 questions, about two minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("onnxruntime-cpu", "openvino-bf16", "openvino-f32")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="test questions (default 300)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks/results/cpu_openvino_1b")
    args = p.parse_args(argv)

    from feather_runtime import Pipeline

    from feather_export.export.artifact import ExportOptions, export
    from feather_export.quality.synthetic import make_samples

    samples = make_samples("test", args.n)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, budget in (("none", None), ("feather", 64)):
            reference = None
            for weights in ("float", "int8"):
                quant = {} if weights == "float" else {"weights": "int8", "lm_head_weights": "int8"}
                path = export("tiny-shapes", Path(tmp) / f"{method}-{weights}",
                              ExportOptions(method=method, budget=budget, **quant),
                              progress=lambda m: None)
                answers = {}
                for backend in BACKENDS:
                    pipe = Pipeline.load(path, backend=backend)
                    answers[backend] = [pipe.generate(image=s.image(), prompt=s.question,
                                                      max_new_tokens=8).text.strip()
                                        for s in samples]
                    pipe.close()
                reference = reference or answers["onnxruntime-cpu"]     # float, ONNX Runtime
                label = (method if budget is None else f"{method}@{budget}") + \
                    ("" if weights == "float" else " int8 weights")
                rows[label] = {b: {"same_as_onnxruntime_fp32": sum(x == y for x, y in
                                                                   zip(a, reference)),
                                   "correct": sum(x == s.answer for x, s in zip(a, samples)),
                                   "questions": len(samples)} for b, a in answers.items()}
    args.results.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join(["python", "benchmarks/openvino_accuracy.py",
                                     *(argv if argv is not None else sys.argv[1:])]),
              "model": "tiny-shapes", "split": "test", "results": rows}
    (args.results / "openvino_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
