"""feather_runtime.Pipeline end to end: exported tiny artifacts vs the PyTorch reference, state,
memory, sampling, stop strings/streaming, timings, errors, threads, import weight, export atomicity.

Every artifact is exported once per module (tiny exports take ~0.1 s) and loaded once.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import hf_generate, tiny_inputs
from feather_export.export.artifact import ExportOptions, export
from feather_export.models.tiny import TINY_MODELS
from feather_export.methods.reference import reference_generate
from feather_runtime import FeatherError, Pipeline, Result
from feather_runtime.sampling import Sampler, SamplingConfig

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"
NEW_TOKENS = 16
LOGITS_ATOL = 1e-4          # fp32 artifact vs the PyTorch reference, last-token logits
FP16_KEPT_OVERLAP = 0.9     # fp16 artifact: fraction of the reference's kept indices also kept
FP16_LOGITS_RTOL = 2e-2     # fp16 artifact: max |dlogit| / max |logit|, when first tokens differ
RSS_GROWTH_LIMIT_MB = 20.0  # 200 calls after warm-up


def _geometry(name):
    spec = TINY_MODELS[name]
    side = spec.image_size // spec.patch_size
    return side * side, spec.layers


def _cases():
    """(name, method, export/reference kwargs): none once, three budgets for each pruning method."""
    schedules = {"tiny": "1:37,3:5", "tiny-gqa": "2:37,5:9,7:3"}   # odd counts; 3 stages on gqa
    cases = []
    for name in ("tiny", "tiny-gqa"):
        n, _ = _geometry(name)
        cases.append((name, "none", {}))
        cases += [(name, "feather", {"budget": n // 4}), (name, "feather", {"budget": n // 9}),
                  (name, "feather", {"schedule": schedules[name]})]
        cases += [(name, "fastv", {"budget": n // 4}), (name, "fastv", {"budget": n // 9}),
                  (name, "fastv", {"schedule": "1:37"})]
        cases += [(name, "fastervlm", {"budget": n // 4}), (name, "fastervlm", {"budget": n // 9}),
                  (name, "fastervlm", {"budget": 37})]
    return cases


CASES = _cases()


def _case_id(case):
    name, method, kw = case
    return "-".join([name, method, *(f"{k}={v}" for k, v in kw.items())])


# ---- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """artifact(name, method="none", **ExportOptions fields) -> exported directory (cached)."""
    cache = {}

    def get(name, method="none", **opts):
        key = (name, method, tuple(sorted(opts.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("artifact") / f"{name}-{method}"
            cache[key] = export(name, out, ExportOptions(method=method, **opts),
                                progress=lambda msg: None)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def pipeline(artifact):
    """pipeline(name, method="none", **opts) -> a loaded Pipeline (cached; shared across tests)."""
    cache = {}

    def get(name, method="none", **opts):
        key = (name, method, tuple(sorted(opts.items())))
        if key not in cache:
            cache[key] = Pipeline.load(artifact(name, method, **opts))
        return cache[key]

    return get


@pytest.fixture(scope="module")
def small_bounds(artifact):
    """An artifact built with max_text_tokens=8 and max_new_tokens=8."""
    return artifact("tiny", "feather", max_text_tokens=8, max_new_tokens=8)


def _same(a: Result, b: Result) -> bool:
    return (a.token_ids == b.token_ids and a.kept == b.kept
            and np.array_equal(a.first_logits, b.first_logits))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- 1. parity with the PyTorch reference (and transformers for none) -------------------------

@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_generate_ids_matches_reference(tiny_models, pipeline, case):
    name, method, kw = case
    model = tiny_models[name]
    pipe = pipeline(name, method, **kw)
    pixels, ids = tiny_inputs(model, seed=CASES.index(case) % 3)
    got = pipe.generate_ids(pixels, ids, NEW_TOKENS)
    ref = reference_generate(model, pixels, ids, method=method, max_new_tokens=NEW_TOKENS, **kw)

    assert got.token_ids == ref.token_ids
    assert len(got.token_ids) == NEW_TOKENS or got.token_ids[-1] in pipe.eos_token_ids
    assert got.kept == ref.kept
    expected_stages = {"none": 0, "fastv": 1, "fastervlm": 1}.get(method)
    if expected_stages is None:   # feather: two default stages, or one per schedule item
        expected_stages = len(kw["schedule"].split(",")) if "schedule" in kw else 2
    assert len(got.kept) == expected_stages
    np.testing.assert_allclose(got.first_logits, ref.first_logits.numpy(), rtol=0, atol=LOGITS_ATOL)
    if method == "none":
        assert got.token_ids == hf_generate(model, pixels, ids, NEW_TOKENS)


@pytest.mark.parametrize("name,method", [("tiny", "feather"), ("tiny-gqa", "fastervlm")])
def test_fp16_artifact_close_to_fp32_reference(tiny_models, pipeline, name, method):
    """fp16 graphs: kept overlap >= 0.9 per stage; first token equal or logits within 2e-2 rel."""
    model = tiny_models[name]
    pipe = pipeline(name, method, dtype="fp16")
    assert pipe.manifest["dtype"] == "fp16" and pipe.dtype == np.float16
    for seed in (0, 1):
        pixels, ids = tiny_inputs(model, seed)
        got = pipe.generate_ids(pixels, ids, NEW_TOKENS)
        ref = reference_generate(model, pixels, ids, method=method, max_new_tokens=NEW_TOKENS)
        assert len(got.kept) == len(ref.kept)
        for mine, theirs in zip(got.kept, ref.kept):
            assert len(mine) == len(theirs)
            assert len(set(mine) & set(theirs)) / len(theirs) >= FP16_KEPT_OVERLAP
        ref_logits = ref.first_logits.numpy()
        rel = np.abs(got.first_logits.astype(np.float32) - ref_logits).max() / np.abs(ref_logits).max()
        assert got.token_ids[0] == ref.token_ids[0] or rel <= FP16_LOGITS_RTOL, rel
        assert np.isfinite(got.first_logits).all()


# ---- 2. no state leaks between calls ----------------------------------------------------------

def test_repeated_and_alternating_calls_are_identical(tiny_models, pipeline):
    model = tiny_models["tiny"]
    pipe = pipeline("tiny", "feather")
    a, b = tiny_inputs(model, 0), tiny_inputs(model, 1, text=(9, 9), suffix=(3, 4, 5, 6, 7, 8))
    first_a, first_b = pipe.generate_ids(*a, NEW_TOKENS), pipe.generate_ids(*b, NEW_TOKENS)
    assert first_a.token_ids != first_b.token_ids or first_a.kept != first_b.kept
    for _ in range(3):
        assert _same(pipe.generate_ids(*a, NEW_TOKENS), first_a)
        assert _same(pipe.generate_ids(*b, NEW_TOKENS), first_b)
    # a shorter call, a failed call and an abandoned stream leave nothing behind either
    short = pipe.generate_ids(*b, 3)
    assert short.token_ids == first_b.token_ids[:3] and short.kept == first_b.kept
    with pytest.raises(FeatherError):
        pipe.generate_ids(*a, 10**6)
    stream = pipe.stream(image=SHAPES, prompt="Describe the image.", max_new_tokens=8)
    next(stream)
    stream.close()
    assert _same(pipe.generate_ids(*a, NEW_TOKENS), first_a)
    # a second Pipeline on the same artifact agrees with the first
    other = Pipeline.load(pipe.manifest.root)
    assert _same(other.generate_ids(*b, NEW_TOKENS), first_b)


# ---- 3. memory stays flat -----------------------------------------------------------------------

def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * resource.getpagesize() / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc/self/statm (Linux)")
def test_memory_flat_over_200_calls(tiny_models, pipeline):
    model = tiny_models["tiny"]
    pipe = pipeline("tiny", "feather")
    pixels, ids = tiny_inputs(model, 0)
    expected = pipe.generate_ids(pixels, ids, 4).token_ids
    for _ in range(10):
        pipe.generate_ids(pixels, ids, 4)
    gc.collect()
    before = _rss_mb()
    for _ in range(200):
        res = pipe.generate_ids(pixels, ids, 4)
    gc.collect()
    growth = _rss_mb() - before
    print(f"RSS growth over 200 generate_ids calls: {growth:.2f} MB (from {before:.1f} MB)")
    assert res.token_ids == expected
    assert growth < RSS_GROWTH_LIMIT_MB, f"RSS grew {growth:.1f} MB over 200 calls"


def test_decode_step_moves_only_new_rows(tiny_models, artifact):
    """Through the backend's memory counters: a decode step uploads the token, its position and
    one past_length per span, downloads the logits, and copies exactly the new K/V rows (never a
    cache); this is the traffic the CUDA backends make too."""
    model = tiny_models["tiny-gqa"]
    pipe = Pipeline.load(artifact("tiny-gqa", "feather", budget=16))
    pixels, ids = tiny_inputs(model, 1)
    traffic = pipe.memory.traffic

    def measure(tokens):
        before = dict(traffic)
        res = pipe.generate_ids(pixels, ids, tokens)
        assert len(res.token_ids) == tokens
        return {k: traffic[k] - before[k] for k in traffic}

    one, eleven = measure(1), measure(11)
    per_step = {k: (eleven[k] - one[k]) / 10 for k in traffic}
    m = pipe.manifest["model"]
    spans = sum(seg.kind == "decoder" for seg in pipe.manifest.segments)
    assert per_step == {"h2d": 8 * (2 + spans), "d2h": 4 * m["vocab_size"],
                        "d2d": 2 * m["num_layers"] * m["num_key_value_heads"] * m["head_dim"] * 4}
    cache_bytes = sum(2 * len(s.cache.layers) * s.cache.keys[s.cache.layers[0]].nbytes
                      for s in pipe.steps)
    print(f"per decode step: {per_step} bytes; the caches hold {cache_bytes} bytes")


def test_onnxruntime_runner_rebinding(pipeline):
    """I/O binding: new values at a bound address are read, new shapes get new outputs, and a
    refused input is one FeatherError after which the runner works again."""
    from feather_runtime.device import Tensor

    pipe = pipeline("tiny", "feather")
    runner, mem = pipe.runners["embed"], pipe.memory
    want = {t: runner.run({"input_ids": np.asarray([[t, t + 1]], np.int64)})["inputs_embeds"]
            for t in (3, 5)}
    buffer = mem.empty((1, 4), np.int64)
    for t in (3, 5, 3):
        ids = mem.upload(np.asarray([[t, t + 1]], np.int64), into=buffer)
        got = mem.download(runner.run_device({"input_ids": ids})["inputs_embeds"])
        np.testing.assert_array_equal(got, want[t])
    one = mem.upload(np.asarray([[5]], np.int64), into=buffer)
    np.testing.assert_array_equal(mem.download(runner.run_device({"input_ids": one})["inputs_embeds"]),
                                  want[5][:, :1])
    with pytest.raises(FeatherError, match="embed: ONNX Runtime failed"):
        runner.run_device({"input_ids": mem.upload(np.asarray([[3]], np.int32))})
    ids = mem.upload(np.asarray([[3, 4]], np.int64), into=buffer)
    runner.run_device({"input_ids": ids})
    same_place_other_dtype = Tensor(ids.ptr, ids.shape, np.dtype(np.int32))
    with pytest.raises(FeatherError, match="embed: ONNX Runtime failed"):     # bound again, refused
        runner.run_device({"input_ids": same_place_other_dtype})
    ids = mem.upload(np.asarray([[3, 4]], np.int64), into=buffer)
    np.testing.assert_array_equal(mem.download(runner.run_device({"input_ids": ids})["inputs_embeds"]),
                                  want[3])


def test_cuda_binding_mode_on_cpu(tiny_models, artifact):
    """The binding mode the CUDA provider uses (every input bound again on every call; ONNX
    Runtime copies an input consumed on another device when it is bound), run on CPU: the same
    tokens as the CPU mode, which binds only changed inputs."""
    pixels, ids = tiny_inputs(tiny_models["tiny-gqa"], 3)
    art = artifact("tiny-gqa", "fastv", budget=16)
    ref = Pipeline.load(art).generate_ids(pixels, ids, NEW_TOKENS)
    pipe = Pipeline.load(art)
    for runner in pipe.runners.values():
        runner._reuse_inputs = False
    for _ in range(2):
        res = pipe.generate_ids(pixels, ids, NEW_TOKENS)
        assert _same(res, ref)


def test_close_and_context_manager(tiny_models, artifact):
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    art = artifact("tiny", "feather")
    with Pipeline.load(art) as pipe:
        first = pipe.generate_ids(pixels, ids, 4)
    assert pipe.closed and pipe.workspace == {} and pipe.steps == []
    with pytest.raises(FeatherError, match="this Pipeline is closed"):
        pipe.generate_ids(pixels, ids, 4)
    pipe.close()                                                    # idempotent
    assert Pipeline.load(art).generate_ids(pixels, ids, 4).token_ids == first.token_ids


# ---- 4. sampling --------------------------------------------------------------------------------

def test_sampling_seeded_and_greedy_equivalents(tiny_models, pipeline):
    model = tiny_models["tiny"]
    pipe = pipeline("tiny", "feather")
    pixels, ids = tiny_inputs(model, 0)
    greedy = pipe.generate_ids(pixels, ids, 8).token_ids

    def sample(**kw):
        return pipe.generate_ids(pixels, ids, 8, **kw).token_ids

    hot = dict(temperature=3.0)
    assert sample(seed=0, **hot) == sample(seed=0, **hot)
    assert sample(seed=0, **hot) != sample(seed=1, **hot)      # near-flat distribution: they differ
    assert sample(seed=0, **hot) != greedy
    assert sample(temperature=1.0, top_k=1, seed=5) == greedy
    assert sample(temperature=1.0, top_p=1e-6, seed=5) == greedy
    assert sample(temperature=0.0, seed=7) == greedy            # 0 = greedy, seed irrelevant


def test_sampler_distribution_and_filters():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    sampler = Sampler(SamplingConfig(temperature=1.0, seed=123))
    draws = np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    top2 = Sampler(SamplingConfig(temperature=1.0, top_k=2, seed=1))
    assert {top2(logits) for _ in range(300)} == {2, 3}
    nucleus = Sampler(SamplingConfig(temperature=1.0, top_p=0.65, seed=2))   # 0.4 + 0.3 >= 0.65
    assert {nucleus(logits) for _ in range(300)} == {2, 3}
    assert Sampler(SamplingConfig())(logits) == 3                              # greedy


@pytest.mark.parametrize("kwargs,phrase", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), "top_p must be in"),
    (dict(temperature=1.0, top_p=1.5), "top_p must be in"),
    (dict(top_k=-1), "top_k must be >= 0"),
])
def test_invalid_sampling_options(tiny_models, pipeline, kwargs, phrase):
    pipe = pipeline("tiny", "feather")
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    with pytest.raises(FeatherError, match=phrase):
        pipe.generate_ids(pixels, ids, 4, **kwargs)
    assert pipe.generate_ids(pixels, ids, 2).token_ids   # the pipeline is still usable


# ---- 5. stop strings, EOS, streaming ---------------------------------------------------------

def _decoded_prefixes(pipe, tokens):
    return [pipe.prompt_builder.decode(tokens[:i]) for i in range(1, len(tokens) + 1)]


@pytest.mark.parametrize("name,method,prompt", [
    ("tiny", "none", "Where is the red square?"),       # 'l', 'tre', 'l', ... text pieces
    ("tiny", "feather", "Describe the image."),         # byte-fallback runs, then text
    ("tiny-gqa", "feather", "Describe the image."),
])
def test_stream_concatenates_to_generate_text(pipeline, name, method, prompt):
    pipe = pipeline(name, method)
    full = pipe.generate(image=SHAPES, prompt=prompt, max_new_tokens=24)
    assert full.text == pipe.prompt_builder.decode(full.token_ids)
    pieces = list(pipe.stream(image=SHAPES, prompt=prompt, max_new_tokens=24))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == full.text
    if method == "none":          # mostly text pieces: it really streams, piece by piece
        assert len(pieces) >= len(full.token_ids) // 2


def test_stop_string_truncates_text_and_stream(pipeline):
    pipe = pipeline("tiny", "none")
    prompt = "Where is the red square?"
    full = pipe.generate(image=SHAPES, prompt=prompt, max_new_tokens=24)
    stop = "rel"           # spans two tokens ('tre', 'l') in this answer
    assert stop in full.text and full.text.index(stop) > 0
    res = pipe.generate(image=SHAPES, prompt=prompt, max_new_tokens=24, stop=stop)
    assert res.text == full.text[:full.text.index(stop)]
    assert stop not in res.text
    assert len(res.token_ids) < len(full.token_ids)
    assert res.token_ids == full.token_ids[:len(res.token_ids)]
    assert stop in pipe.prompt_builder.decode(res.token_ids)  # generation ended on the stop
    # several stops: the earliest wins; a stop that never occurs changes nothing
    res2 = pipe.generate(image=SHAPES, prompt=prompt, max_new_tokens=24, stop=["zzz", "ltr", stop])
    assert res2.text == full.text[:full.text.index("ltr")]
    assert pipe.generate(image=SHAPES, prompt=prompt, max_new_tokens=24, stop=["zzz"]).text == full.text
    # streaming with the stop yields exactly the truncated text, nothing of the stop string
    pieces = list(pipe.stream(image=SHAPES, prompt=prompt, max_new_tokens=24, stop=stop))
    assert "".join(pieces) == res.text
    # generate_ids honours stop strings too (it decodes only for them)
    pixels, ids = pipe.encode(SHAPES, prompt)
    assert pipe.generate_ids(pixels, ids, 24, stop=stop).token_ids == res.token_ids


class _Scripted:
    """Stands in for the Sampler: returns a fixed token sequence, whatever the logits."""
    script: list[int] = []

    def __init__(self, config):
        self.i = 0

    def __call__(self, logits):
        self.i += 1
        return self.script[self.i - 1]


def test_stream_multibyte_characters_and_stops(tiny_models, pipeline, monkeypatch):
    """Byte-fallback pieces of multi-byte characters are never streamed half-decoded."""
    import feather_runtime.pipeline as pipeline_module

    pipe = pipeline("tiny", "fastervlm")
    target = "Zähle 🙂 die Kreise: 字 und ∑ rot"
    script = pipe.prompt_builder.tokenizer.encode(target, add_special_tokens=False).ids
    pieces_of = [pipe.prompt_builder.tokenizer.id_to_token(t) for t in script]
    assert sum(p.startswith("<0x") for p in pieces_of) >= 8      # really goes through bytes
    monkeypatch.setattr(_Scripted, "script", script)
    monkeypatch.setattr(pipeline_module, "Sampler", _Scripted)
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    n = len(script)
    full = pipe.generate_ids(pixels, ids, n, decode_text=True)
    assert full.token_ids == script
    assert full.text == pipe.prompt_builder.decode(script) and "🙂" in full.text and "字" in full.text
    pieces = list(pipe.stream(image=SHAPES, prompt="Describe the image.", max_new_tokens=n))
    assert "".join(pieces) == full.text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)
    for stop in ("字", "e K", "∑ r", "🙂"):
        cut = full.text[:full.text.index(stop)]
        res = pipe.generate(image=SHAPES, prompt="Describe the image.", max_new_tokens=n, stop=stop)
        assert res.text == cut, stop
        streamed = "".join(pipe.stream(image=SHAPES, prompt="Describe the image.",
                                       max_new_tokens=n, stop=[stop]))
        assert streamed == cut, stop


def test_eos_ends_generation(tmp_path, artifact, tiny_models):
    """With token X declared EOS (manifest edit in a copy), generation stops right after X."""
    src = artifact("tiny", "fastv")
    pipe = Pipeline.load(src)
    pixels, ids = tiny_inputs(tiny_models["tiny"], 2)
    full = pipe.generate_ids(pixels, ids, NEW_TOKENS)
    k = next(i for i in range(1, len(full.token_ids)) if full.token_ids[i] not in full.token_ids[:i])
    eos = full.token_ids[k]
    copy = _copy(src, tmp_path / "eos")
    manifest = json.loads((copy / "feather.json").read_text())
    manifest["model"]["eos_token_ids"] = [eos]
    (copy / "feather.json").write_text(json.dumps(manifest))
    res = Pipeline.load(copy).generate_ids(pixels, ids, NEW_TOKENS)
    assert res.token_ids == full.token_ids[:k + 1]
    assert res.kept == full.kept


# ---- 6. image path end to end and timings --------------------------------------------------------

@pytest.mark.parametrize("name,method", [("tiny", "feather"), ("tiny-gqa", "fastervlm"),
                                         ("tiny", "none")])
def test_generate_from_image_path_with_timings(pipeline, name, method):
    pipe = pipeline(name, method)
    res = pipe.generate(image=str(SHAPES), prompt="Where is the red square?", max_new_tokens=6)
    assert isinstance(res, Result) and len(res.token_ids) == 6
    assert res.text == pipe.prompt_builder.decode(res.token_ids)
    assert len(res.kept) == len(pipe.stages)
    segments = [s.name for s in pipe.manifest.segments]
    for key in [*segments, "selection", "ttft", "decode", "decode_tokens_per_s"]:
        assert key in res.timings, key
        assert res.timings[key] >= 0
    assert "vision" in segments and "embed" in segments
    assert res.timings["ttft"] >= res.timings["vision"]
    assert res.timings["decode_tokens_per_s"] > 0
    selects = [k for k in segments if k.startswith("select_")]
    assert res.timings["selection"] == pytest.approx(sum(res.timings[k] for k in selects))
    # a Path and a PIL image give the same answer as the str path
    from PIL import Image
    with Image.open(SHAPES) as im:
        again = pipe.generate(image=im, prompt="Where is the red square?", max_new_tokens=6)
    assert again.token_ids == res.token_ids


# ---- 7. errors ----------------------------------------------------------------------------------

def test_error_artifact_dir_missing(tmp_path):
    with pytest.raises(FeatherError, match="does not exist"):
        Pipeline.load(tmp_path / "nowhere")


def test_error_manifest_missing(tmp_path, artifact):
    copy = _copy(artifact("tiny", "feather"), tmp_path / "a")
    (copy / "feather.json").unlink()
    with pytest.raises(FeatherError, match="has no feather.json: the artifact is incomplete"):
        Pipeline.load(copy)


def test_error_segment_file_tampered(tmp_path, artifact):
    copy = _copy(artifact("tiny", "feather"), tmp_path / "a")
    target = copy / "onnx" / "decoder_0_1.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(FeatherError, match=r"decoder_0_1\.onnx does not match its hash .*tampered"):
        Pipeline.load(copy)
    Pipeline.load(copy, verify=False)          # same size: only hashing notices
    copy2 = _copy(artifact("tiny", "feather"), tmp_path / "b")
    (copy2 / "onnx" / "select_1.onnx").unlink()
    with pytest.raises(FeatherError, match=r"select_1\.onnx is missing"):
        Pipeline.load(copy2)


def test_error_manifest_format_version(tmp_path, artifact):
    copy = _copy(artifact("tiny", "feather"), tmp_path / "a")
    manifest = json.loads((copy / "feather.json").read_text())
    manifest["format_version"] = 99
    (copy / "feather.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatherError, match="built with manifest format 99.*reads format 1.*Rebuild"):
        Pipeline.load(copy)


def test_error_prompt_longer_than_max_text_tokens(tiny_models, small_bounds):
    pipe = Pipeline.load(small_bounds)
    model = tiny_models["tiny"]
    pixels, ids = tiny_inputs(model, 0, text=(5, 6, 7), suffix=(8, 9, 10, 11))   # 8 text tokens
    assert len(pipe.generate_ids(pixels, ids, 8).token_ids) == 8
    pixels, ids = tiny_inputs(model, 0, text=(5, 6, 7), suffix=(8, 9, 10, 11, 12))
    with pytest.raises(FeatherError, match="the prompt has 9 text tokens; this artifact allows 8"):
        pipe.generate_ids(pixels, ids, 4)
    with pytest.raises(FeatherError, match="allows 8"):
        pipe.generate(image=SHAPES, prompt="Where is the red square?", max_new_tokens=4)


def test_error_max_new_tokens_above_bound(tiny_models, small_bounds):
    pipe = Pipeline.load(small_bounds)
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    for bad in (9, 0):
        with pytest.raises(FeatherError, match="max_new_tokens must be between 1 and 8"):
            pipe.generate_ids(pixels, ids, bad)


def test_default_max_new_tokens_fits_every_artifact(tiny_models, small_bounds):
    """Without max_new_tokens, generation runs up to min(64, the artifact's limit), never an error."""
    pipe = Pipeline.load(small_bounds)
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    assert pipe.default_max_new_tokens() == 8
    assert len(pipe.generate_ids(pixels, ids, ignore_eos=True).token_ids) == 8
    assert 1 <= len(pipe.generate(image=SHAPES, prompt="Hi").token_ids) <= 8
    assert "".join(pipe.stream(image=SHAPES, prompt="Hi")) == pipe.generate(image=SHAPES,
                                                                            prompt="Hi").text
    for bad in (2.5, "8", True):
        with pytest.raises(FeatherError, match="max_new_tokens must be an integer"):
            pipe.generate_ids(pixels, ids, bad)


def test_ignore_eos_generates_past_end_of_sequence(artifact):
    pipe = Pipeline.load(artifact("tiny-shapes", "feather", max_new_tokens=12))
    short = pipe.generate(image=SHAPES, prompt="Where is the red square?")
    assert short.text == "top left" and short.token_ids[-1] in pipe.eos_token_ids
    assert len(short.token_ids) < 12
    full = pipe.generate(image=SHAPES, prompt="Where is the red square?", ignore_eos=True)
    assert len(full.token_ids) == 12 and full.token_ids[:len(short.token_ids)] == short.token_ids


def test_bf16_artifact_is_refused_before_any_session(tmp_path, monkeypatch):
    path = export("tiny", tmp_path / "art", ExportOptions(method="none", dtype="bf16"),
                  progress=lambda m: None)
    import feather_runtime.pipeline as pipeline_module

    def no_backend(*a, **k):
        raise AssertionError("a backend was created for a bf16 artifact")

    monkeypatch.setattr(pipeline_module, "get_backend", no_backend)
    with pytest.raises(FeatherError, match=r"bf16 graphs.*--dtype fp16.*--dtype fp32"):
        Pipeline.load(path)


def test_error_unreadable_image(tmp_path, pipeline):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(os.urandom(64) + b"not an image")
    pipe = pipeline("tiny", "feather")
    with pytest.raises(FeatherError, match="cannot read image"):
        pipe.generate(image=bad, prompt="What is this?")
    with pytest.raises(FeatherError, match="image file not found"):
        pipe.generate(image=tmp_path / "absent.png", prompt="What is this?")


def test_error_image_none(pipeline):
    pipe = pipeline("tiny", "feather")
    with pytest.raises(FeatherError, match="needs an image"):
        pipe.generate(prompt="What is this?")
    with pytest.raises(FeatherError, match="needs an image"):
        list(pipe.stream(image=None, prompt="What is this?"))


def test_error_wrong_pixel_values_shape(tiny_models, pipeline):
    pipe = pipeline("tiny", "feather")
    pixels, ids = tiny_inputs(tiny_models["tiny-gqa"], 0)     # 224 px, the artifact wants 336
    _, tiny_ids = tiny_inputs(tiny_models["tiny"], 0)
    with pytest.raises(FeatherError, match=r"pixel_values must have shape \(1, 3, 336, 336\)"):
        pipe.generate_ids(pixels, tiny_ids, 4)
    with pytest.raises(FeatherError, match="pixel_values must have shape"):
        pipe.generate_ids(pixels[0], tiny_ids, 4)


def test_error_input_ids_without_image_block(tiny_models, pipeline):
    pipe = pipeline("tiny", "feather")
    pixels, ids = tiny_inputs(tiny_models["tiny"], 0)
    image_id = pipe.image_token_id
    no_image = ids[ids != image_id][None]
    with pytest.raises(FeatherError, match="one contiguous block of 576 image tokens.*found 0"):
        pipe.generate_ids(pixels, no_image, 4)
    split = ids.copy()
    split[0, 100] = 5                                                  # hole in the block
    split = np.concatenate([split, [[image_id]]], axis=1)              # still 576 in total
    with pytest.raises(FeatherError, match="contiguous block of 576"):
        pipe.generate_ids(pixels, split, 4)
    _, gqa_ids = tiny_inputs(tiny_models["tiny-gqa"], 0)               # 256 image tokens
    with pytest.raises(FeatherError, match="found 256"):
        pipe.generate_ids(pixels, gqa_ids, 4)


# ---- 8. threads -----------------------------------------------------------------------------

def test_concurrent_threads_get_reference_results(tiny_models, pipeline):
    model = tiny_models["tiny"]
    pipe = pipeline("tiny", "fastv")
    inputs = [tiny_inputs(model, 0), tiny_inputs(model, 1, text=(7,), suffix=(3, 3, 4))]
    expected = [reference_generate(model, px, ids, method="fastv", max_new_tokens=8)
                for px, ids in inputs]
    assert expected[0].token_ids != expected[1].token_ids
    barrier = threading.Barrier(2)
    results, errors = {0: [], 1: []}, []

    def work(i):
        try:
            barrier.wait()
            for _ in range(6):
                results[i].append(pipe.generate_ids(*inputs[i], 8))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    for i in (0, 1):
        assert len(results[i]) == 6
        for res in results[i]:
            assert res.token_ids == expected[i].token_ids
            assert res.kept == expected[i].kept


def test_same_thread_reentry_is_refused_not_deadlocked(tiny_models, pipeline):
    model = tiny_models["tiny"]
    pipe = pipeline("tiny", "fastv")
    pixels, ids = tiny_inputs(model, 0)
    stream = pipe._generate(pixels, ids, 4, stream=True)
    next(stream)                                            # holds the lock, half-read
    with pytest.raises(FeatherError, match="unfinished stream"):
        pipe.generate_ids(pixels, ids, 4)
    stream.close()                                          # releases it
    assert len(pipe.generate_ids(pixels, ids, 4).token_ids) == 4


# ---- 9. the runtime stays torch/transformers-free -------------------------------------------

HEAVY = ("torch", "transformers")


def _run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_runtime_import_does_not_load_torch_or_transformers():
    out = _run_python(f"""
        import json, sys
        import feather_runtime, feather_runtime.pipeline, feather_runtime.backends.onnxruntime
        import feather_runtime.preprocess, feather_runtime.prompt, feather_runtime.manifest
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))
    """)
    assert out == []


def test_runtime_generation_does_not_load_torch_or_transformers(artifact):
    path = artifact("tiny", "feather")
    out = _run_python(f"""
        import json, sys
        import numpy as np
        from feather_runtime import Pipeline
        pipe = Pipeline.load({str(path)!r})
        n, size = pipe.num_image_tokens, pipe.manifest["model"]["image_size"]
        pixels = np.zeros((1, 3, size, size), np.float32)
        ids = np.array([[1, 5, 6] + [pipe.image_token_id] * n + [7, 8]], np.int64)
        res = pipe.generate_ids(pixels, ids, 4)
        text = pipe.generate(image={str(SHAPES)!r}, prompt="Where is the red square?",
                             max_new_tokens=4).text
        heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})
        print(json.dumps({{"heavy": heavy, "tokens": res.token_ids, "text": text}}))
    """)
    assert out["heavy"] == []
    assert len(out["tokens"]) == 4


# ---- 10. export atomicity ----------------------------------------------------------------------

def _leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    import feather_export.export.artifact as ex

    real, calls = ex._export_segment, []

    def flaky(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) > 1:
            raise RuntimeError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_export_segment", flaky)
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="simulated"):
        export("tiny", out, ExportOptions(method="feather"), progress=lambda m: None)
    assert len(calls) == 2
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_reexport_keeps_previous_artifact(tmp_path, monkeypatch):
    import feather_export.export.artifact as ex

    out = export("tiny", tmp_path / "art", ExportOptions(method="fastv"), progress=lambda m: None)
    before = (out / "feather.json").read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(ex, "_export_segment", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export("tiny", out, ExportOptions(method="feather"), progress=lambda m: None)
    assert (out / "feather.json").read_text() == before
    assert _leftovers(tmp_path) == []
    Pipeline.load(out)


def test_export_refuses_non_empty_foreign_directory(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FeatherError, match="not empty and is not a feather-export artifact"):
        export("tiny", out, ExportOptions(method="feather"), progress=lambda m: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "precious"
    assert _leftovers(tmp_path) == []
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(FeatherError, match="not a directory"):
        export("tiny", file_out, ExportOptions(method="feather"), progress=lambda m: None)


def test_reexport_replaces_previous_artifact(tmp_path, tiny_models):
    out = tmp_path / "art"
    export("tiny", out, ExportOptions(method="feather"), progress=lambda m: None)
    assert (out / "onnx" / "decoder_0_1.onnx").is_file()
    (out / "stray.txt").write_text("from the old artifact")
    export("tiny", out, ExportOptions(method="fastv", budget=37), progress=lambda m: None)
    manifest = json.loads((out / "feather.json").read_text())
    assert manifest["prune"]["method"] == "fastv"
    assert not (out / "onnx" / "decoder_0_1.onnx").exists()      # feather-only segment gone
    assert not (out / "stray.txt").exists()
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(
        Path(s["file"]).name for s in manifest["segments"])
    assert _leftovers(tmp_path) == []
    model = tiny_models["tiny"]
    pixels, ids = tiny_inputs(model, 0)
    res = Pipeline.load(out).generate_ids(pixels, ids, 4)
    ref = reference_generate(model, pixels, ids, method="fastv", budget=37, max_new_tokens=4)
    assert res.token_ids == ref.token_ids and res.kept == ref.kept
    # an empty directory is a fine target too
    empty = tmp_path / "empty"
    empty.mkdir()
    export("tiny", empty, ExportOptions(method="none"), progress=lambda m: None)
    assert (empty / "feather.json").is_file()
