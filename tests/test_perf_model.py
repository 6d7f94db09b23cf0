"""The performance model (docs/design.md §5): FLOPs against hand-computed values, bytes against the
exported weights, segment plans against the exporter, roofline arithmetic, the device table."""
from __future__ import annotations

import onnx
import pytest

from feather_export.models.geometry import ModelGeometry
from feather_export.methods.config import PruneConfig
from feather_export.export.artifact import ExportOptions, export, plan_segments
from feather_export.bench.perf_model import (DEVICES, Cost, Device, LlmGeometry, ModelShape,
                                             VisionGeometry, decode_costs, decoder_layer_flops,
                                             device_for_gpu_name, measure_cpu_device,
                                             prefill_costs, roofline_seconds, select_cost,
                                             shape_from_config, shape_from_manifest, span_cost,
                                             total, vision_layer_flops)
from feather_runtime.manifest import load_manifest

# a small MHA config: d = 64, m = 128, 4 layers, vocab 500, CLIP c = 32, m_v = 128, 2 layers,
# 336 px / 14 -> 576 image tokens
LLM = LlmGeometry(layers=4, hidden=64, heads=4, kv_heads=4, head_dim=16, intermediate=128,
                  vocab=500)
VISION = VisionGeometry(336, 14, 32, 128, 2, 64, 64)
SHAPE = ModelShape(LLM, VISION)


def test_decoder_layer_flops_matches_design_formula_by_hand():
    # docs/design.md §5: 2 n (4 d^2 + 3 d m) + 2 n^2 d with n = 10, d = 64, m = 128
    assert decoder_layer_flops(10, 64, 128) == 2 * 10 * (4 * 4096 + 3 * 64 * 128) + 2 * 100 * 64
    assert decoder_layer_flops(10, 64, 128) == 832_000
    # one decode token over 20 cached: projections + 2*1*d (its own key) + 4*P*d
    assert decoder_layer_flops(1, 64, 128, past=20) == 81_920 + 128 + 5_120


def test_decoder_layer_flops_gqa_counts_smaller_kv_projections():
    # q_dim 64, kv_dim 32: 2 n (2 d q + 2 d kv + 3 d m) + 2 n^2 q
    n = 3
    expected = 2 * n * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128) + 2 * n * n * 64
    assert decoder_layer_flops(n, 64, 128, q_dim=64, kv_dim=32) == expected


def test_vision_layer_flops_by_hand():
    # non-causal: 2 n (4 c^2 + 2 c m) + 4 n^2 c with n = 5, c = 8, m = 32
    assert vision_layer_flops(5, 8, 32) == 10 * (256 + 512) + 800 == 8_480


def test_prefill_costs_none_by_hand():
    text = 17
    costs = prefill_costs(SHAPE, None, text, "fp32")
    assert [c.name for c in costs] == ["vision", "embed", "decoder_0_4"]
    n = 576 + text
    dec = costs[2]
    assert dec.tokens == n
    assert dec.cost.flops == 4 * decoder_layer_flops(n, 64, 128) + 2 * 64 * 500   # + lm_head
    v = costs[0].cost.flops
    conv = 2 * 576 * 3 * 14 * 14 * 32
    proj = 2 * 576 * (32 * 64 + 64 * 64)
    assert v == conv + 2 * vision_layer_flops(577, 32, 128) + proj
    assert costs[1].cost.flops == 0


def test_prefill_costs_feather_tokens_and_scoring_by_hand():
    geo = ModelGeometry(4, 576, 24)
    cfg = PruneConfig.create("feather", geo, budget=144)          # K1 = 1, K2 = 2, B2 = 13
    text = 10
    costs = prefill_costs(SHAPE, cfg, text, "fp32")
    names = [c.name for c in costs]
    assert names == [s.name for s in plan_segments(4, cfg)]
    by = {c.name: c for c in costs}
    assert by["decoder_0_1"].tokens == 586
    assert by["decoder_1_2"].tokens == 10 + 144
    assert by["decoder_2_4"].tokens == 10 + 13
    # FEATHER scoring: the span's last query against the 576 (then 144) image keys it output
    assert by["select_1"].cost.flops == 2 * 576 * 64
    assert by["select_2"].cost.flops == 2 * 144 * 64
    assert by["decoder_1_2"].cost.flops == decoder_layer_flops(154, 64, 128)


def test_fastv_scores_the_whole_row_and_fastervlm_shortens_the_sequence():
    geo = ModelGeometry(4, 576, 24)
    fastv = {c.name: c for c in prefill_costs(SHAPE, PruneConfig.create("fastv", geo, budget=144),
                                               10, "fp32")}
    assert fastv["select_2"].cost.flops == 2 * 586 * 64           # the whole causal row
    fvlm = {c.name: c for c in prefill_costs(
        SHAPE, PruneConfig.create("fastervlm", geo, budget=144), 10, "fp32")}
    assert fvlm["select_0"].cost.flops == 0
    assert fvlm["decoder_0_4"].tokens == 154


def test_decode_costs_use_each_span_cache():
    geo = ModelGeometry(4, 576, 24)
    cfg = PruneConfig.create("feather", geo, budget=144)
    spans = {c.name: c for c in decode_costs(SHAPE, cfg, 600, "fp32")}
    assert spans["decoder_0_1"].past == 600
    assert spans["decoder_1_2"].past == 600 - (576 - 144)
    assert spans["decoder_2_4"].past == 600 - (576 - 13)
    assert spans["decoder_1_2"].cost.flops == decoder_layer_flops(1, 64, 128, past=168)
    fvlm = decode_costs(SHAPE, PruneConfig.create("fastervlm", geo, budget=144), 600, "fp32")
    assert fvlm[1].past == 600 - 432


def test_bytes_are_at_least_the_weights_once():
    c = span_cost(LLM, 4, 1, 0, True, 2)
    weights = (4 * LLM.layer_params() + 64 * 500 + 64) * 2
    assert weights <= c.bytes < weights * 1.05
    sel = select_cost(LLM, "feather", 600, 576, 144, 4)
    assert sel.bytes >= (576 * 64 + 600 * 64 + 168 * 64) * 4         # keys, hidden in and out


def test_roofline_is_the_max_of_compute_and_memory_time():
    dev = Device("x", "x", {"fp16": 100.0}, 10.0, "test")
    assert roofline_seconds(Cost(1000.0, 10.0), dev, "fp16") == 10.0      # compute bound
    assert roofline_seconds(Cost(100.0, 1000.0), dev, "fp16") == 100.0    # memory bound
    assert roofline_seconds(Cost(100.0, 1.0), dev, "bf16") == 1.0         # bf16 falls back to fp16


def test_device_table_and_gpu_name_mapping():
    assert DEVICES["h100-sxm"].peak("bf16") == 989e12 and DEVICES["h100-sxm"].bandwidth == 3.35e12
    assert DEVICES["h200"].bandwidth == 4.8e12
    assert DEVICES["a100"].peak("fp16") == 312e12
    assert DEVICES["agx-orin"].bandwidth == 204.8e9
    assert DEVICES["orin-nano"].bandwidth == 68e9 and "assumption" in DEVICES["orin-nano"].source
    assert device_for_gpu_name("NVIDIA H100 80GB HBM3").key == "h100-sxm"
    assert device_for_gpu_name("NVIDIA H200").key == "h200"
    assert device_for_gpu_name("NVIDIA A100-SXM4-80GB").key == "a100"
    assert device_for_gpu_name("Orin (nvgpu)").key == "agx-orin"
    assert device_for_gpu_name("Tesla T4") is None


def test_cpu_microbenchmark_reports_positive_figures():
    dev = measure_cpu_device(quick=True)
    assert dev.key == "cpu" and dev.peak("fp32") > 0 and dev.bandwidth > 0
    assert {"numpy_copy_bandwidth", "ort_gemv_bandwidth"} <= set(dev.measured)


def _initializer_params(path, prefixes):
    model = onnx.load(str(path))
    count = 0
    for t in model.graph.initializer:
        if t.name.startswith(prefixes):
            size = 1
            for d in t.dims:
                size *= d
            count += size
    return count


def test_parameter_counts_match_the_exported_weights(tmp_path):
    art = export("tiny", tmp_path / "a", ExportOptions(method="feather", budget=144),
                 progress=lambda m: None)
    manifest = load_manifest(art)
    shape = shape_from_manifest(manifest)
    assert shape.vision.layers == 1 and shape.vision.hidden == 32     # feature layer -2 of 2
    vision = _initializer_params(art / "onnx/vision.onnx",
                                 ("patch_embedding", "class_embedding", "position_embedding",
                                  "pre_layrnorm", "vision.layers", "projector"))
    assert vision == shape.vision.params()
    last = _initializer_params(art / "onnx/decoder_2_4.onnx", ("layers.", "norm.", "lm_head"))
    llm = shape.llm
    assert last == 2 * llm.layer_params() + llm.hidden * llm.vocab + llm.hidden


def test_llava_7b_shape_has_about_7b_parameters():
    from feather_export.models.shapes import shape_llava_config

    shape = shape_from_config(shape_llava_config("shape-llava-1.5-7b"))
    llm = shape.llm
    params = (llm.layers * llm.layer_params() + 2 * llm.vocab * llm.hidden + llm.hidden
              + shape.vision.params())
    assert 7.0e9 < params < 7.1e9           # llava-1.5-7b: 7.06B (its last CLIP layer unused)
    assert shape.num_image_tokens == 576 and shape.vision.layers == 23
    c = total(prefill_costs(shape, None, 40, "fp16"))
    assert 8e12 < c.flops < 1e13            # ~2 * 6.7B * 616 tokens + vision + attention


def test_bad_dtype_peak_is_a_user_error():
    from feather_runtime import FeatherError

    with pytest.raises(FeatherError, match="no fp8 peak"):
        DEVICES["h100-sxm"].peak("fp8")
