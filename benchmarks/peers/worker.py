#!/usr/bin/env python
"""One engine of the peer benchmark, in its own process (driven by benchmarks/peers/peers.py).

    python worker.py ENGINE PATH --image IMG --prompt TEXT --new-tokens 16 [--props JSON]

ENGINE: ``ours`` (feather_runtime on ONNX Runtime CPU; PATH = an artifact), ``torch``
(transformers LlavaForConditionalGeneration, sdpa, fp32; PATH = the checkpoint), ``openvino``
(OpenVINO GenAI VLMPipeline; PATH = an optimum-intel export; run with the OpenVINO venv's python).
Loads once, then answers one JSON line per line read on stdin (``run`` or ``quit``); the last
answer carries the process's peak RSS. Imports only what its engine needs; installs nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def peak_rss_gib() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    return float("nan")


class Ours:
    """feather_runtime Pipeline (the same calls as ``feather-export run``): ONNX Runtime CPU, or
    the backend named in ``props["backend"]``."""

    def __init__(self, path, image, prompt, new_tokens, props):
        from feather_runtime import Pipeline
        from feather_runtime.backends.onnxruntime import OnnxRuntimeBackend
        from feather_runtime.manifest import load_manifest

        if props.get("backend"):          # e.g. openvino-bf16 (feather_runtime.backends)
            from feather_runtime.backends import get_backend

            backend = get_backend(props["backend"])
            if props.get("threads"):
                backend.threads = props["threads"]
        else:
            backend = OnnxRuntimeBackend(device="cpu", threads=props.get("threads"),
                                         session_config=tuple(props.get("session_config",
                                                                        {}).items()))
        manifest = load_manifest(path, verify=False)
        runners = {s.name: backend.load(manifest.root, s) for s in manifest.segments}
        self.pipe = Pipeline(manifest, backend, runners)
        self.pixels, self.ids = self.pipe.encode(image, prompt)
        self.new_tokens = new_tokens
        self.info = {"onnxruntime": __import__("onnxruntime").__version__,
                     "prompt_tokens": int(self.ids.shape[1])}

    def run(self) -> dict:
        res = self.pipe.generate_ids(self.pixels, self.ids, self.new_tokens, ignore_eos=True)
        t = res.timings
        spans = {k: v for k, v in t.items() if k.startswith(("vision", "decoder", "select", "embed"))}
        return {"ttft_s": t["ttft"], "decode_tok_s": t["decode_tokens_per_s"],
                "tokens": res.token_ids, "segments_s": spans}


class _StepClock:
    """A logits processor that timestamps every generation step: the first call comes right
    after the prefill forward (TTFT), the others after each decode forward."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class Torch:
    """transformers' own generate, sdpa attention, fp32; the same pixel values and prompt ids as
    ours (feather_runtime's preprocessing, which the project's tests hold equal to transformers')."""

    def __init__(self, path, image, prompt, new_tokens, props):
        import torch
        from transformers import LlavaForConditionalGeneration

        from feather_runtime.preprocess import ImagePreprocessor, load_image
        from feather_runtime.prompt import PromptBuilder

        if props.get("threads"):
            torch.set_num_threads(int(props["threads"]))
        self.torch = torch
        self.model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=torch.float32, attn_implementation="sdpa").eval()
        # generate exactly new_tokens greedy tokens past EOS, as ours (ignore_eos) does: no EOS
        # at all, rather than min_new_tokens (which masks EOS and so changes the argmax)
        self.model.generation_config.eos_token_id = None
        pixels = ImagePreprocessor.from_dir(path)(load_image(image))
        n_img = self.model.config.image_seq_length
        ids = PromptBuilder.from_dir(path).build(prompt, n_img)
        self.pixels = torch.from_numpy(pixels)
        self.ids = torch.from_numpy(ids)
        self.new_tokens = new_tokens
        # wall time of the vision tower + projector (the part our `vision` segment covers)
        self.vision_s = []
        inner = self.model.model
        inner.vision_tower.register_forward_pre_hook(lambda *a: self.vision_s.append(-time.perf_counter()))
        inner.multi_modal_projector.register_forward_hook(
            lambda *a: self.vision_s.append(self.vision_s.pop() + time.perf_counter()))
        self.info = {"torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "attn_implementation": self.model.config._attn_implementation,
                     "torch_threads": torch.get_num_threads(), "prompt_tokens": int(ids.shape[1])}

    def run(self) -> dict:
        from transformers import LogitsProcessorList

        clock = _StepClock()
        self.vision_s.clear()
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(
                input_ids=self.ids, attention_mask=self.torch.ones_like(self.ids),
                pixel_values=self.pixels, max_new_tokens=self.new_tokens, do_sample=False,
                logits_processor=LogitsProcessorList([clock]))
            end = time.perf_counter()
        tokens = out[0, self.ids.shape[1]:].tolist()
        s = clock.stamps
        steps = len(s) - 1
        decode = (s[-1] - s[0]) if steps else 0.0
        # ours counts decode from the first sampled token to the last: the same span here
        ttft = s[0] - t0
        vision = sum(self.vision_s)
        return {"ttft_s": ttft, "decode_tok_s": steps / decode if decode else 0.0,
                "tokens": tokens, "total_s": end - t0,
                "segments_s": {"vision": vision, "decoder (prefill, incl. merge)": ttft - vision}}


class OpenVino:
    """OpenVINO GenAI's VLMPipeline on the CPU plugin. ``props`` go to the plugin (e.g.
    INFERENCE_PRECISION_HINT=f32 forces fp32; empty = OpenVINO's defaults)."""

    def __init__(self, path, image, prompt, new_tokens, props):
        import numpy as np
        import openvino as ov
        import openvino_genai as genai
        from PIL import Image

        plugin = {k: v for k, v in props.items() if k != "threads"}
        if props.get("threads"):
            plugin["INFERENCE_NUM_THREADS"] = int(props["threads"])
        # prefix caching off: VLMPipeline otherwise reuses the KV cache of a repeated image and
        # prompt across generate() calls (measured: TTFT 1.4 s repeated vs 5.5-7 s for a new
        # image), which no other engine here does and no real request gets
        scheduler = genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        self.pipe = genai.VLMPipeline(str(path), "CPU", scheduler_config=scheduler, **plugin)
        rgb = np.asarray(Image.open(image).convert("RGB"), dtype=np.uint8)
        self.image = ov.Tensor(rgb[None])
        # the driver passes the whole prompt as our runtime renders it, with GenAI's universal
        # image tag in place of <image> (GenAI expands it to the image tokens); no chat template
        self.prompt = prompt
        cfg = genai.GenerationConfig()
        cfg.max_new_tokens = new_tokens
        cfg.ignore_eos = True
        cfg.do_sample = False
        cfg.apply_chat_template = False
        self.cfg = cfg
        self.genai = genai
        core = ov.Core()
        self.info = {"openvino": ov.__version__, "openvino_genai": genai.__version__,
                     "plugin_properties": plugin,
                     "cpu_default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))}

    def run(self) -> dict:
        tokens = []
        genai = self.genai

        class Collect(genai.StreamerBase):
            def write(self, token):
                tokens.extend(token if isinstance(token, list) else [token])
                return genai.StreamingStatus.RUNNING

            def end(self):
                pass

        t0 = time.perf_counter()
        res = self.pipe.generate(self.prompt, images=[self.image], generation_config=self.cfg,
                                 streamer=Collect())
        end = time.perf_counter()
        pm = res.perf_metrics
        tpot_ms = pm.get_tpot().mean
        return {"ttft_s": pm.get_ttft().mean / 1e3, "decode_tok_s": 1e3 / tpot_ms if tpot_ms else 0.0,
                "tokens": tokens, "total_s": end - t0,
                "prompt_tokens": int(pm.get_num_input_tokens())}


ENGINES = {"ours": Ours, "torch": Torch, "openvino": OpenVino}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("engine", choices=sorted(ENGINES))
    p.add_argument("path")
    p.add_argument("--image", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--props", default="{}", help="engine properties as JSON")
    args = p.parse_args()
    t0 = time.perf_counter()
    engine = ENGINES[args.engine](args.path, args.image, args.prompt, args.new_tokens,
                                  json.loads(args.props))
    say({"ready": True, "load_s": time.perf_counter() - t0, "info": engine.info,
         "rss_after_load_gib": peak_rss_gib()})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "run":
            out = engine.run()
            out["peak_rss_gib"] = peak_rss_gib()
            say(out)
        elif cmd == "quit":
            break
    say({"done": True, "peak_rss_gib": peak_rss_gib()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
