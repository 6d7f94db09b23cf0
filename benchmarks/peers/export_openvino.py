#!/usr/bin/env python
"""Export a LLaVA checkpoint to OpenVINO IR with optimum-intel, for the peer benchmark.

Runs in the OpenVINO venv (benchmarks/peers/setup_openvino.sh), not the project's:

    .venv-ov/bin/python benchmarks/peers/export_openvino.py CHECKPOINT OUT [--weight-format fp32]

Two adaptations of the checkpoint, made in a staging copy (the checkpoint is left as it is):
- weight names: optimum-intel (transformers < 5.6) expects the CLIP tower under
  ``vision_tower.vision_model.*``, the language model under ``language_model.model.*`` and the head
  as ``language_model.lm_head.*`` (the layout llava-hf checkpoints ship); transformers 5 saves
  ``model.vision_tower.*`` / ``model.language_model.*`` / ``lm_head.*``: renamed.
- tokenizer: openvino-tokenizers' converter rejects a Metaspace pre-tokenizer; the tiny tokenizer's
  Metaspace (prepend "first", split) is rewritten as Llama-2's form (normalizer Prepend("▁") +
  Replace(" ", "▁"), no pre-tokenizer). The benchmark records whether the prompt length agrees.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def rename_key(key: str) -> str:
    for old, new in (("model.vision_tower.", "vision_tower."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head.")):
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def stage_weights(src: Path, dst: Path) -> int:
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(src.glob("*.safetensors"))
    renamed = 0
    for f in files:
        tensors = {}
        with safe_open(str(f), "pt") as h:
            meta = h.metadata()
            for k in h.keys():
                new = rename_key(k)
                renamed += new != k
                tensors[new] = h.get_tensor(k)
        save_file(tensors, str(dst / f.name), metadata=meta)
        del tensors
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename_key(k): v for k, v in data["weight_map"].items()}
        (dst / index.name).write_text(json.dumps(data, indent=2))
    return renamed


def stage_tokenizer(dst: Path) -> bool:
    path = dst / "tokenizer.json"
    if not path.is_file():
        return False
    tok = json.loads(path.read_text())
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace":
        return False
    rep = pre.get("replacement", "\u2581")
    tok["pre_tokenizer"] = None
    tok["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": rep},
        {"type": "Replace", "pattern": {"String": " "}, "content": rep}]}
    path.write_text(json.dumps(tok, ensure_ascii=False))
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--weight-format", default="fp32", help="fp32 (default), fp16, int8 (nncf)")
    args = p.parse_args()
    src, out = Path(args.checkpoint), Path(args.out)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ov-stage-") as tmp:
        stage = Path(tmp)
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, stage / f.name)
        renamed = stage_weights(src, stage)
        rewrote = stage_tokenizer(stage)
        print(f"staged {src} -> {stage}: {renamed} weight names adapted, tokenizer rewritten: {rewrote}",
              file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "optimum.commands.optimum_cli", "export", "openvino",
               "--model", str(stage), "--task", "image-text-to-text",
               "--weight-format", args.weight_format, str(out)]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        rc = subprocess.call(cmd)
    if rc == 0:
        # optimum-intel leaves preprocessor_config.json out; GenAI then assumes 336x336 CLIP input
        for name in ("preprocessor_config.json",):
            if (src / name).is_file() and not (out / name).is_file():
                shutil.copy2(src / name, out / name)
    return rc


if __name__ == "__main__":
    sys.exit(main())
