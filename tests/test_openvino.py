"""The OpenVINO backend: f32 equals ONNX Runtime token for token; bf16 answers the trained
tiny-shapes eval questions as fp32 does at a measured rate (the accuracy guard)."""
from __future__ import annotations

import pytest

pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install "
                                       "'feather-export[openvino]')")

from feather_runtime import Pipeline  # noqa: E402

from feather_export.errors import FeatherError  # noqa: E402
from feather_export.export.artifact import ExportOptions, export  # noqa: E402


def _generate(path, backend, sample_or_image, prompt=None, n=8):
    pipe = Pipeline.load(path, backend=backend)
    try:
        image = sample_or_image
        return pipe.generate(image=image, prompt=prompt, max_new_tokens=n, ignore_eos=True)
    finally:
        pipe.close()


@pytest.mark.parametrize("model, options", [
    ("tiny", ExportOptions(method="feather", budget=9)),
    ("tiny-qwen2-siglip", ExportOptions(method="fastv", budget=64)),
    ("tiny-clip-full", ExportOptions(method="fastervlm", budget=64)),
    ("tiny-next", ExportOptions(method="feather")),
])
def test_f32_equals_onnxruntime(tmp_path, model, options):
    """OpenVINO's CPU plugin at f32 runs vision/embed/decoder segments, ONNX Runtime the select
    segments, in one host memory: the same tokens and kept indices as ONNX Runtime alone."""
    from PIL import Image

    path = export(model, tmp_path / model, options, progress=lambda m: None)
    image = Image.new("RGB", (90, 60), (200, 40, 30))
    ort = _generate(path, "onnxruntime-cpu", image, "What is red?")
    ov = _generate(path, "openvino-f32", image, "What is red?")
    assert ov.token_ids == ort.token_ids
    assert ov.kept == ort.kept


def test_bf16_answers_like_fp32_on_the_trained_eval():
    """The accuracy guard of the bf16 path: 60 test questions of the trained tiny-shapes model,
    answered by ONNX Runtime fp32 and by OpenVINO bf16 (none, FEATHER@64, and FEATHER@64 with int8
    decoder and lm_head weights, which OpenVINO runs as compressed weights)."""
    import tempfile
    from pathlib import Path

    from feather_export.quality.synthetic import make_samples

    samples = make_samples("test", 60)
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for method, budget, weights in (("none", None, "float"), ("feather", 64, "float"),
                                        ("feather", 64, "int8")):
            quant = {} if weights == "float" else {"weights": weights, "lm_head_weights": weights}
            path = export("tiny-shapes", Path(tmp) / f"{method}-{weights}",
                          ExportOptions(method=method, budget=budget, **quant),
                          progress=lambda m: None)
            answers = {}
            for backend in ("onnxruntime-cpu", "openvino-bf16"):
                pipe = Pipeline.load(path, backend=backend)
                answers[backend] = [pipe.generate(image=s.image(), prompt=s.question,
                                                  max_new_tokens=8).text.strip()
                                    for s in samples]
                pipe.close()
            same = sum(a == b for a, b in zip(*answers.values())) / len(samples)
            right = {b: sum(a == s.answer for a, s in zip(answers[b], samples)) / len(samples)
                     for b in answers}
            rates[f"{method} {weights}"] = (same, right)
    for method, (same, right) in rates.items():
        assert same >= 0.95, rates
        assert right["openvino-bf16"] >= right["onnxruntime-cpu"] - 0.05, rates


def test_unknown_precision_refused():
    from feather_runtime.backends.openvino import OpenVinoBackend

    with pytest.raises(FeatherError, match="precision 'fp8'"):
        OpenVinoBackend("fp8")


def test_auto_picks_openvino_bf16_only_where_the_cpu_has_bf16_units():
    from feather_runtime.backends import get_backend
    from feather_runtime.backends.openvino import default_precision

    backend = get_backend("auto")
    expected = "openvino-bf16-cpu" if default_precision() == "bf16" else "onnxruntime-cpu"
    assert backend.name == expected
    backend.close()


def test_bf16_keeps_the_value_cache_in_bfloat16(tmp_path):
    """At bf16 the decoder spans take and give their value cache in bfloat16 (no fp32 copy of the
    cache is converted per decode step), keys in the artifact's fp32 (FastV scores with them);
    decode steps read the cache the prefill wrote: a FastV artifact generates, with the kept
    indices of ONNX Runtime fp32."""
    import ml_dtypes
    import numpy as np
    from PIL import Image

    path = export("tiny", tmp_path / "fastv", ExportOptions(method="fastv", budget=9),
                  progress=lambda m: None)
    image = Image.new("RGB", (90, 60), (200, 40, 30))
    pipe = Pipeline.load(path, backend="openvino-bf16")
    try:
        bf16 = np.dtype(ml_dtypes.bfloat16)
        assert (pipe.key_dtype, pipe.value_dtype) == (np.float32, bf16)
        assert {t.dtype for s in pipe.steps for t in s.cache.values.values()} == {bf16}
        assert {t.dtype for s in pipe.steps for t in s.cache.keys.values()} == {np.dtype(np.float32)}
        result = pipe.generate(image=image, prompt="What is red?", max_new_tokens=6,
                               ignore_eos=True)
        assert len(result.token_ids) == 6
    finally:
        pipe.close()
    ort = _generate(path, "onnxruntime-cpu", image, "What is red?", n=6)
    assert result.kept == ort.kept


def test_bf16_runner_takes_float_arrays_on_its_bf16_cache_ports(tmp_path):
    """``run`` (validation, sweeps) with the artifact's fp32 arrays on the bf16 KV ports: they
    are converted, and bf16 outputs come back as float32 close to the f32 backend's."""
    import numpy as np

    from feather_runtime.backends.openvino import OpenVinoBackend
    from feather_runtime.manifest import load_manifest

    path = export("tiny", tmp_path / "none", ExportOptions(method="none"), progress=lambda m: None)
    manifest = load_manifest(path)
    seg = next(s for s in manifest.segments if s.kind == "decoder")
    rng = np.random.default_rng(0)
    feeds = {"position_ids": np.asarray([[12]], np.int64), "past_length": np.asarray(12, np.int64)}
    for spec in seg.inputs:
        shape = [1 if d == "seq" else 16 if d == "capacity" else d for d in spec["shape"]]
        if spec["dtype"] == "float32":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(np.float32)
    outs = {}
    for precision in ("bf16", "f32"):
        backend = OpenVinoBackend(precision)
        outs[precision] = backend.load(manifest.root, seg).run(feeds)
        backend.close()
    for name, ref in outs["f32"].items():
        got = outs["bf16"][name]
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.allclose(got, ref, rtol=0.05, atol=0.05 * float(np.abs(ref).max())), name
