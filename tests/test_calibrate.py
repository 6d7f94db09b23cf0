"""feather-export calibrate: per-layer image-token similarity, the documented schedule rule, determinism."""
import json

import numpy as np
import pytest

from feather_export.errors import FeatherError
from feather_export.methods.config import PruneConfig
from feather_export.models.geometry import ModelGeometry
from feather_export.quality.calibrate import (CalibrateOptions, calibrate, layer_similarity,
                                              suggest_schedule)


def test_rule_on_uniform_change_is_the_reference_schedule():
    # every layer changes the image tokens equally: C(k) = k / L, so K_s = ceil(L q_s)
    assert suggest_schedule([0.9] * 32, 576) == "3:288,6:144,14:48,22:0"
    assert suggest_schedule([0.9] * 40, 576) == "4:288,8:144,18:48,28:0"


def test_rule_follows_where_the_change_is():
    early = [0.5, 0.6] + [0.99] * 30          # the first layers change the image tokens most
    late = [0.99] * 30 + [0.5, 0.6]
    assert suggest_schedule(early, 576) == "1:288,2:144,3:48,4:0"
    assert suggest_schedule(late, 576) == "12:288,23:144,30:48,31:0"   # 3rd capped to fit the 4th
    assert suggest_schedule([0.99] * 8 + [0.2] * 8, 256) == "9:128,10:64,12:21,14:0"


def test_rule_fits_shallow_decoders_and_refuses_one_layer():
    assert suggest_schedule([0.9] * 4, 256) == "1:128,2:64,3:0"      # S = 3 stages
    assert suggest_schedule([0.9] * 3, 256) == "1:128,2:0"
    assert suggest_schedule([0.9, 0.2], 256) == "1:128"
    assert suggest_schedule([1.0, 1.0, 1.0, 1.0, 1.0], 64) == "1:32,2:16,3:5,4:0"   # no change
    with pytest.raises(FeatherError, match="at least 2 layers"):
        suggest_schedule([0.9], 256)
    for sims in ([0.9] * 5, [0.1] + [0.99] * 6, [0.99] * 6 + [0.1], list(np.linspace(0.5, 1, 12))):
        schedule = suggest_schedule(sims, 576)                       # always taken as is
        PruneConfig.create("btp", ModelGeometry(len(sims), 576, 24), schedule=schedule)


def test_layer_similarity_matches_transformers_hidden_states(tiny_models):
    """The per-layer inputs are transformers' own output_hidden_states (embeddings, layer outputs)."""
    import torch
    from conftest import tiny_inputs

    model = tiny_models["tiny-gqa"]
    pixels, ids = tiny_inputs(model, 3)
    got = layer_similarity(model, pixels, ids)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixels),
                    output_hidden_states=True)
    start = int(np.flatnonzero(ids[0] == model.config.image_token_index)[0])
    rows = slice(start, start + model.config.image_seq_length)
    hs = out.hidden_states                      # L + 1; the last one has the final norm applied
    for layer in range(len(got) - 1):
        cos = torch.nn.functional.cosine_similarity(hs[layer][0, rows], hs[layer + 1][0, rows], dim=-1)
        assert abs(float(cos.mean()) - got[layer]) < 1e-5


def test_calibrate_is_deterministic_and_writes_json_and_plot(tmp_path):
    a = calibrate(CalibrateOptions(synthetic=3, out=str(tmp_path / "a")), progress=lambda m: None)
    b = calibrate(CalibrateOptions(synthetic=3, out=str(tmp_path / "b")), progress=lambda m: None)
    assert a == b
    saved = json.loads((tmp_path / "a" / "calibration.json").read_text())
    assert saved["similarity"] == a["similarity"] and len(a["similarity"]) == 4
    assert all(0 < s <= 1 for s in a["similarity"])
    assert saved["suggested_schedule"] == suggest_schedule(a["similarity"], 256)
    assert (tmp_path / "a" / "similarity.png").stat().st_size > 1000


def test_calibrate_cli_on_user_data_and_schedule_taken_by_build(tmp_path, capsys):
    from PIL import Image

    from feather_export.cli.main import main
    from feather_export.quality.synthetic import make_samples

    lines = []
    for i, s in enumerate(make_samples("val", 2, seed=5)):
        s.image().save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": s.question, "answers": [s.answer]}))
    (tmp_path / "cal.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["calibrate", "--model", "tiny-gqa", "--data", str(tmp_path / "cal.jsonl"),
                 "--out", str(tmp_path / "c")]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    schedule = printed["suggested_schedule"]
    assert main(["export", "--model", "tiny-gqa", "--method", "btp", "--schedule", schedule,
                 "--out", str(tmp_path / "art")]) == 0
    manifest = json.loads((tmp_path / "art" / "feather.json").read_text())
    assert ",".join(f"{s['layer']}:{s['keep']}" for s in manifest["prune"]["stages"]) == schedule
    assert Image.open(tmp_path / "c" / "similarity.png").size[0] > 100


@pytest.mark.parametrize("argv, phrase", [
    (["--synthetic", "0"], "positive integer"),
    (["--data", "/nonexistent.jsonl"], "no such file"),
    (["--model", "/nonexistent", "--synthetic", "1"], "does not exist"),
])
def test_calibrate_user_errors_are_one_line(capsys, argv, phrase):
    from feather_export.cli.main import main

    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0]
