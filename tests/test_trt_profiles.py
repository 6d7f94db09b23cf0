"""Engine plans for TensorRT (pure Python, runs everywhere): optimization profiles of tiny
artifacts, engine names, trtexec command lines, precision rules, reuse keys and the engine index.
"""
from __future__ import annotations

import copy
import json

import pytest

from feather_export.export.artifact import ExportOptions, export
from feather_export.tensorrt.plans import (DECODE, PREFILL, EngineIndex, ShapeRange, engine_file,
                                           format_command, plan_engines, resolve_precision)
from feather_runtime import FeatherError
from feather_runtime.manifest import load_manifest

N, T, G = 576, 512, 512          # tiny: 24 x 24 image tokens; default text / new-token limits
ENV = {"tensorrt": "10.3.0", "device": {"name": "Orin", "compute_capability": "8.7"},
       "builder": {"tf32": False, "workspace_mib": None}, "plugin_sha256": None}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("trt_profiles")
    quiet = lambda msg: None  # noqa: E731
    specs = {"feather": dict(method="feather"), "feather64": dict(method="feather", budget=64),
             "fastv": dict(method="fastv"), "fastervlm": dict(method="fastervlm"),
             "none": dict(method="none"),
             "small": dict(method="feather", max_text_tokens=8, max_new_tokens=1),
             "fp16": dict(method="feather", dtype="fp16")}
    return {name: load_manifest(export("tiny", root / name, ExportOptions(**kw), progress=quiet)).data
            for name, kw in specs.items()}


def _plans(manifest, precision=None):
    return {p.segment: p for p in plan_engines(manifest, precision)}


def _profile(plan, role):
    return next(p for p in plan.profiles if p.role == role)


def _ranges(plan, role):
    return {name: (r.min, r.opt, r.max) for name, r in _profile(plan, role).shapes}


def test_feather_profiles(artifacts):
    plans = _plans(artifacts["feather"])
    assert list(plans) == ["vision", "embed", "decoder_0_1", "select_1", "decoder_1_2", "select_2",
                           "decoder_2_4"]
    assert plans["vision"].profiles == ()                       # static shapes: no profile
    assert _ranges(plans["embed"], PREFILL) == {"input_ids": ((1, N), (1, N + 32), (1, N + T))}
    assert _ranges(plans["embed"], DECODE) == {"input_ids": ((1, 1), (1, 1), (1, 1))}
    # before the first prune point: every image token; prefill has an empty cache (capacity 0)
    d01 = _ranges(plans["decoder_0_1"], PREFILL)
    assert d01["inputs_embeds"] == ((1, N, 64), (1, N + 32, 64), (1, N + T, 64))
    assert d01["position_ids"] == ((1, N), (1, N + 32), (1, N + T))
    assert d01["past_key_values.0.key"] == ((1, 4, 0, 16),) * 3
    assert "past_length" not in d01                             # a scalar: no profile needed
    d01 = _ranges(plans["decoder_0_1"], DECODE)
    assert d01["inputs_embeds"] == ((1, 1, 64),) * 3
    # decode: the runtime's whole static buffer, capacity fixed at n + T + G
    assert d01["past_key_values.0.value"] == ((1, 4, N + T + G, 16),) * 3
    # after the prune points: the kept counts (144, then round(0.09 * 144) = 13)
    assert _ranges(plans["decoder_1_2"], PREFILL)["inputs_embeds"][2] == (1, 144 + T, 64)
    assert _ranges(plans["decoder_1_2"], DECODE)["past_key_values.1.key"] == ((1, 4, 144 + T + G, 16),) * 3
    assert _ranges(plans["decoder_2_4"], PREFILL)["inputs_embeds"] == ((1, 13, 64), (1, 45, 64),
                                                                       (1, 13 + T, 64))
    assert set(_ranges(plans["decoder_2_4"], DECODE)) == {
        "inputs_embeds", "position_ids", *(f"past_key_values.{i}.{kv}" for i in (2, 3)
                                           for kv in ("key", "value"))}
    # selection: prefill only, sequence = text + the tokens entering the stage; image_start static
    assert [p.role for p in plans["select_1"].profiles] == [PREFILL]
    assert _ranges(plans["select_1"], PREFILL) == {
        "score_keys.0": ((1, 4, N, 16), (1, 4, N + 32, 16), (1, 4, N + T, 16)),
        "hidden_states": ((1, N, 64), (1, N + 32, 64), (1, N + T, 64)),
        "position_ids": ((1, N), (1, N + 32), (1, N + T))}
    assert _ranges(plans["select_2"], PREFILL)["hidden_states"][0] == (1, 144, 64)


@pytest.mark.parametrize("name", ["feather", "feather64", "fastv", "fastervlm", "none", "small",
                                  "fp16"])
def test_profile_invariants(artifacts, name):
    manifest = artifacts[name]
    for seg, plan in zip(manifest["segments"], plan_engines(manifest)):
        dynamic = {i["name"] for i in seg["inputs"] if not all(isinstance(d, int) for d in i["shape"])}
        assert len({p.role for p in plan.profiles}) == len(plan.profiles)
        if not dynamic:
            assert plan.profiles == ()
            continue
        if seg["kind"] in ("embed", "decoder"):
            assert [p.role for p in plan.profiles] == [PREFILL, DECODE]   # one engine, two profiles
        else:
            assert [p.role for p in plan.profiles] == [PREFILL]
        for profile in plan.profiles:
            assert {n for n, _ in profile.shapes} == dynamic            # static inputs not listed
            for _, r in profile.shapes:
                assert all(0 <= a <= b <= c for a, b, c in zip(r.min, r.opt, r.max))
            ranges = dict(profile.shapes)
            if profile.role == DECODE:
                seq_input = "input_ids" if seg["kind"] == "embed" else "inputs_embeds"
                assert ranges[seq_input].min[1] == ranges[seq_input].max[1] == 1
                for n, r in ranges.items():
                    if n.startswith("past_key_values."):          # fixed capacity, heads-first
                        assert r.min[2] == r.opt[2] == r.max[2] > 0
            elif seg["kind"] == "decoder":
                for n, r in ranges.items():
                    if n.startswith("past_key_values."):
                        assert r.min[2] == r.max[2] == 0


def test_fastervlm_and_none(artifacts):
    plans = _plans(artifacts["fastervlm"])
    assert list(plans) == ["vision", "select_0", "embed", "decoder_0_4"]
    assert plans["select_0"].profiles == () and plans["select_0"].engine == "engines/select_0.b144.fp32.plan"
    assert plans["embed"].engine == "engines/embed.fp32.plan"       # input_ids still hold N placeholders
    assert _ranges(plans["embed"], PREFILL)["input_ids"][0] == (1, N)
    assert plans["decoder_0_4"].engine == "engines/decoder_0_4.b144.fp32.plan"
    assert _ranges(plans["decoder_0_4"], PREFILL)["inputs_embeds"][0] == (1, 144, 64)
    plans = _plans(artifacts["none"])
    assert [p.engine for p in plans.values()] == ["engines/vision.fp32.plan", "engines/embed.fp32.plan",
                                                  "engines/decoder_0_4.fp32.plan"]
    assert not any(p.budget_dependent for p in plans.values())


def test_small_limits_clamp_opt(artifacts):
    plans = _plans(artifacts["small"])             # --max-text-tokens 8 --max-new-tokens 1
    assert _ranges(plans["embed"], PREFILL)["input_ids"] == ((1, N), (1, N + 8), (1, N + 8))
    decode = _ranges(plans["decoder_0_1"], DECODE)["past_key_values.0.key"]
    assert decode == ((1, 4, N + 8 + 1, 16),) * 3


def test_engine_names_and_budget_dependence(artifacts):
    names = {p.segment: (p.engine, p.budget_dependent) for p in plan_engines(artifacts["feather"], "fp16")}
    assert names == {
        "vision": ("engines/vision.fp16.plan", False),
        "embed": ("engines/embed.fp16.plan", False),
        "decoder_0_1": ("engines/decoder_0_1.fp16.plan", False),
        "select_1": ("engines/select_1.b144.fp16.plan", True),
        "decoder_1_2": ("engines/decoder_1_2.b144.fp16.plan", True),
        "select_2": ("engines/select_2.b144.fp16.plan", True),
        "decoder_2_4": ("engines/decoder_2_4.b144.fp16.plan", True)}
    assert engine_file("decoder_0_1", "bf16", None) == "engines/decoder_0_1.bf16.plan"
    assert _plans(artifacts["feather64"])["select_1"].engine == "engines/select_1.b64.fp32.plan"


def test_precision_rules(artifacts):
    assert resolve_precision("fp32", None) == ("fp32", True)
    assert resolve_precision("fp32", "fp16") == ("fp16", False)       # weakly typed, fp32 I/O
    assert resolve_precision("fp32", "bf16") == ("bf16", False)
    assert resolve_precision("fp16", None) == ("fp16", True)
    assert resolve_precision("bf16", "bf16") == ("bf16", True)
    with pytest.raises(FeatherError, match="holds fp16 graphs"):
        resolve_precision("fp16", "bf16")
    with pytest.raises(FeatherError, match="not one of"):
        resolve_precision("fp32", "int8")
    plan = _plans(artifacts["fp16"])["decoder_0_1"]
    assert plan.strongly_typed and plan.engine == "engines/decoder_0_1.fp16.plan"
    assert "--stronglyTyped" in plan.trtexec_command() and "--fp16" not in plan.trtexec_command()
    assert "--fp16" in _plans(artifacts["feather"], "fp16")["vision"].trtexec_command()


def test_precision_rules_on_strongly_typed_only_tensorrt(artifacts):
    """TensorRT 11: the artifact's dtype, strongly typed; any other precision is refused."""
    assert resolve_precision("fp32", None, strongly_typed_only="11.4.0") == ("fp32", True)
    assert resolve_precision("fp16", "fp16", strongly_typed_only="11.4.0") == ("fp16", True)
    for dtype, precision in (("fp32", "fp16"), ("fp32", "bf16"), ("fp16", "fp32")):
        with pytest.raises(FeatherError, match=f"TensorRT 11.4.0 builds strongly typed networks only.*"
                                               f"artifact's dtype, {dtype}.*--dtype {precision}"):
            resolve_precision(dtype, precision, strongly_typed_only="11.4.0")
    plans = plan_engines(artifacts["fp16"], strongly_typed_only="11.0.0")
    assert all(p.strongly_typed and p.precision == "fp16" for p in plans)


def test_trtexec_commands(artifacts):
    plans = _plans(artifacts["feather"])
    cmd = format_command(plans["embed"].trtexec_command("ART"))
    assert cmd == ("trtexec --onnx=ART/onnx/embed.onnx --saveEngine=ART/engines/embed.fp32.plan "
                   "--stronglyTyped --noTF32 "
                   f"--profile=0 --minShapes=input_ids:1x{N} --optShapes=input_ids:1x{N + 32} "
                   f"--maxShapes=input_ids:1x{N + T} "
                   "--profile=1 --minShapes=input_ids:1x1 --optShapes=input_ids:1x1 "
                   "--maxShapes=input_ids:1x1 --skipInference")
    argv = plans["decoder_0_1"].trtexec_command("ART", timing_cache="ART/engines/timing.cache",
                                                workspace_mib=4096)
    assert argv.count("--profile=0") == 1 and argv.count("--profile=1") == 1
    assert argv.index("--profile=0") < argv.index("--profile=1")
    mins = [a for a in argv if a.startswith("--minShapes=")]
    assert "past_key_values.0.key:1x4x0x16" in mins[0]
    assert f"past_key_values.0.key:1x4x{N + T + G}x16" in mins[1]
    assert "past_length" not in " ".join(argv)                      # scalar input: no shape option
    assert f"inputs_embeds:1x{N}x64" in mins[0] and "inputs_embeds:1x1x64" in mins[1]
    assert "--timingCacheFile=ART/engines/timing.cache" in argv
    assert "--memPoolSize=workspace:4096M" in argv
    assert not any(a.startswith("--dynamicPlugins") for a in argv)   # no select op in a decoder
    sel = plans["select_1"].trtexec_command("ART", plugin_library="/opt/libfeather_plugin.so")
    assert "--dynamicPlugins=/opt/libfeather_plugin.so" in sel
    assert not any(a.startswith("--dynamicPlugins") for a in plans["select_1"].trtexec_command("ART"))
    vision = plans["vision"].trtexec_command("ART")                  # static: no shape options
    assert not any(a.startswith(("--profile", "--minShapes")) for a in vision)
    assert "--tf32" not in plans["vision"].trtexec_command(tf32=True)
    assert "--noTF32" not in plans["vision"].trtexec_command(tf32=True)


def test_reuse_keys_across_budgets(artifacts):
    a, b = _plans(artifacts["feather"]), _plans(artifacts["feather64"])
    for name in ("vision", "embed", "decoder_0_1"):          # budget-independent: same engine
        assert a[name].engine == b[name].engine
        assert a[name].key(ENV) == b[name].key(ENV)
    # same ONNX file after the prune point (weights only), but profiles sized by the kept count
    assert a["decoder_1_2"].onnx_sha256 == b["decoder_1_2"].onnx_sha256
    assert a["decoder_1_2"].key(ENV) != b["decoder_1_2"].key(ENV)
    assert a["select_1"].key(ENV) != b["select_1"].key(ENV)
    # everything in the environment matters
    base = a["decoder_0_1"].key(ENV)
    for change in ({"tensorrt": "10.7.0"}, {"device": {"name": "H100", "compute_capability": "9.0"}},
                   {"builder": {"tf32": True, "workspace_mib": None}}, {"plugin_sha256": "ab"}):
        assert a["decoder_0_1"].key({**ENV, **change}) != base
    assert _plans(artifacts["feather"], "fp16")["decoder_0_1"].key(ENV) != base
    assert a["decoder_0_1"].key(json.loads(json.dumps(ENV))) == base          # canonical JSON


def test_unknown_dims_and_kinds_are_refused(artifacts):
    manifest = copy.deepcopy(artifacts["feather"])
    manifest["segments"][2]["inputs"][0]["shape"] = [1, "batch", 64]
    with pytest.raises(FeatherError, match="dynamic dimension 'batch'"):
        plan_engines(manifest)
    manifest = copy.deepcopy(artifacts["feather"])
    manifest["segments"][0]["kind"] = "audio"
    with pytest.raises(FeatherError, match="unknown kind 'audio'"):
        plan_engines(manifest)
    with pytest.raises(FeatherError, match="min <= opt <= max"):
        ShapeRange((1, 5), (1, 4), (1, 6))
    with pytest.raises(FeatherError, match="rank"):
        ShapeRange((1,), (1, 4), (1, 6))


def test_engine_index(tmp_path):
    engines = tmp_path / "engines"
    index = EngineIndex.load(engines)                     # no file yet: empty
    assert index.entries == [] and index.data["default_precision"] is None
    engines.mkdir()
    plan_file = engines / "embed.fp16.plan"
    plan_file.write_bytes(b"engine bytes")
    from feather_runtime.manifest import sha256_file
    entry = {"segment": "embed", "precision": "fp16", "key": "k1", "file": "engines/embed.fp16.plan",
             "sha256": sha256_file(plan_file), "size": plan_file.stat().st_size}
    index.put(entry)
    index.put({**entry, "precision": "fp32", "key": "k0"})
    index.put({**entry, "key": "k2"})                     # replaces (embed, fp16)
    assert len(index.entries) == 2 and index.find("embed", "fp16")["key"] == "k2"
    assert index.find_key("k0")["precision"] == "fp32" and index.find_key("k1") is None
    index.save()
    again = EngineIndex.load(engines)
    assert again.data == index.data
    current = again.find("embed", "fp16")
    assert again.is_current(current, "k2", tmp_path)
    assert not again.is_current(current, "k1", tmp_path)             # other key
    assert not again.is_current(None, "k2", tmp_path)
    plan_file.write_bytes(b"engine bytez")                            # same size, other content
    assert again.is_current(current, "k2", tmp_path, verify=False)
    assert not again.is_current(current, "k2", tmp_path)
    plan_file.unlink()
    assert not again.is_current(current, "k2", tmp_path)
    (engines / "engines.json").write_text("{not json")
    with pytest.raises(FeatherError, match="not valid JSON"):
        EngineIndex.load(engines)
    (engines / "engines.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(FeatherError, match="not a feather-export engine index"):
        EngineIndex.load(engines)
    (engines / "engines.json").write_text(json.dumps({"format": "feather-engines", "format_version": 9}))
    with pytest.raises(FeatherError, match="index format 9"):
        EngineIndex.load(engines)
