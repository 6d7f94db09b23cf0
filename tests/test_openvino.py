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
    answered by ONNX Runtime fp32 and by OpenVINO bf16 (none and FEATHER@64)."""
    import tempfile
    from pathlib import Path

    from feather_export.quality.synthetic import make_samples

    samples = make_samples("test", 60)
    with tempfile.TemporaryDirectory() as tmp:
        rates = {}
        for method, budget in (("none", None), ("feather", 64)):
            path = export("tiny-shapes", Path(tmp) / method, ExportOptions(method=method,
                                                                           budget=budget),
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
            rates[method] = (same, right)
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
