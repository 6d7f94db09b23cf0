"""Train the ``tiny-shapes`` LLaVA from scratch on the synthetic grounding task, on CPU.

``python -m feather_export.quality.train --out DIR [--seed 0 --steps N ...]`` (or
``scripts/train_tiny_vlm.py``). The model is a plain ``LlavaForConditionalGeneration`` (CLIP ViT,
``vision_feature_layer=-2``, default select strategy, Llama with default RoPE), so the reference,
the exporter and the runtime handle it unchanged. Teacher forcing on the answer tokens + EOS, AdamW,
warmup + cosine schedule; the data order is a pure function of the seed (sample ``step * batch + j``
of the train split), weights start from ``torch.manual_seed(seed)``.

Auxiliary vision objectives (``train_aux``; ``--patch-aux-weight``, ``--cls-aux-weight``) stand in
for CLIP pretraining: linear probes on the feature layer, discarded after training.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from feather_runtime.prompt import format_prompt

from feather_export.errors import FeatherError
from feather_export.files import staged_dir
from feather_export.quality.synthetic import Sample, make_conversation, make_samples
from feather_export.quality.train_aux import aux_losses, make_heads

EVAL_SPLIT = "val"          # model selection / progress; the test split is for the final number only


@dataclass(frozen=True)
class ModelSpec:
    """Geometry of the trained tiny LLaVA (224 px / patch 14 -> 16 x 16 = 256 image tokens)."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3          # feature layer -2 -> the output of the second layer
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 4
    heads: int = 1                  # head_dim 64: enough slowly rotating RoPE pairs (theta 1e4) to
    kv_heads: int = 1               # match content across 256 positions; 16-dim heads learn far slower
    intermediate: int = 176
    rope_theta: float = 10000.0
    init_std: float = 0.1           # ~ 1/sqrt(hidden): 0.02 (large-model default) leaves attention
                                    # flat for long on a 64-wide model


@dataclass(frozen=True)
class TrainOptions:
    out: str
    seed: int = 0
    steps: int = 3500
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    cls_aux_weight: float = 0.1     # CLS scene-contents probe (train_aux); 0 disables it
    patch_aux_weight: float = 0.5   # per-patch colour / shape / centre / position probes at the
                                    # vision feature layer; 0 disables them
    llm_aux_weight: float = 0.5     # the same probes on the LLM's image embeddings; 0 disables them
    turns: int = 5                  # questions per training image (multi-turn); eval is single-turn
    # question types (colour, count, where) of the extra turns: more of the types that can only be
    # answered by finding objects by shape, which the model learns last
    turn_weights: tuple[float, float, float] = (0.4, 0.4, 0.2)
    vision_steps: int = 1000        # stage 1: vision tower + probes alone (0: skip)
    eval_every: int = 100
    snapshots: bool = False         # also save the weights at every evaluation (in the partial dir)
    keep_best: bool = True          # save the weights of the best validation evaluation, not the
                                    # last (early stopping on the val split; test stays held out)
    eval_n: int = 256
    threads: int = 2                # the CI machine's 2 cores; weights are reproducible per thread count
    spec: ModelSpec = ModelSpec()


def shapes_llava_config(spec: ModelSpec):
    """The ``LlavaConfig`` of the trained tiny model (vocabulary from the shapes tokenizer)."""
    from feather_export.models.tiny import small_llava_config
    from feather_export.quality.tokenizer import build_shapes_tokenizer

    return small_llava_config(spec, build_shapes_tokenizer(), initializer_range=spec.init_std)


def build_model(spec: ModelSpec, seed: int):
    """A freshly initialised model; the same weights for the same seed."""
    import torch
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = shapes_llava_config(spec)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    grid = spec.image_size // spec.patch_size
    with torch.no_grad():    # 2-D sin-cos start for the (still learned) patch position embeddings
        pos = model.model.vision_tower.embeddings.position_embedding.weight
        pos.zero_()
        pos[1:] = torch.from_numpy(sincos_2d(grid, spec.vision_hidden))
    return model


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """MAE-style 2-D sin-cos position table [grid * grid, dim] (rows, then columns), values in [-1, 1]."""
    if dim % 4:
        raise FeatherError(f"the vision width must be a multiple of 4 for 2-D sin-cos positions, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angle = coord[:, None] * omega[None, :]
        parts += [np.sin(angle), np.cos(angle)]
    return np.concatenate(parts, axis=1).astype(np.float32)


# ---- batches ---------------------------------------------------------------------------------

@dataclass
class Batch:
    pixel_values: "object"          # float32 [B, 3, H, W]
    input_ids: "object"             # int64 [B, T], right-padded
    rows: "object"                  # int64 [K]: (row, position) of every supervised prediction
    cols: "object"
    targets: "object"               # int64 [K]: the answer tokens and EOS
    answer_len: list[int]           # supervised tokens per answer (answer + EOS), in order
    aux: dict | None = None         # train_aux.batch_targets of each row's scene


class Encoder:
    """Samples -> model inputs with the runtime's own preprocessing and prompt building."""

    def __init__(self, checkpoint_dir: str | os.PathLike, num_image_tokens: int, aux: bool = False):
        from feather_runtime.preprocess import ImagePreprocessor
        from feather_runtime.prompt import PromptBuilder

        self.preprocessor = ImagePreprocessor.from_dir(checkpoint_dir)
        self.builder = PromptBuilder.from_dir(checkpoint_dir)
        self.num_image_tokens = num_image_tokens
        self.grid = math.isqrt(num_image_tokens)
        self.aux = aux
        self.pad_id = self.builder.tokenizer.token_to_id("<pad>")

    def pixels(self, sample: Sample) -> np.ndarray:
        return self.preprocessor(sample.image())

    def prompt_ids(self, sample: Sample) -> np.ndarray:
        return self.builder.build(sample.question, self.num_image_tokens)

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's tokens as they follow 'ASSISTANT:' in the conversation, then EOS."""
        ids = self.builder.tokenizer.encode(" " + answer, add_special_tokens=False).ids
        return ids + [self.builder.eos_token_id]

    def turn_ids(self, sample: Sample) -> np.ndarray:
        """A follow-up turn after an answer's EOS: ' USER: {question} ASSISTANT:'."""
        text = " " + format_prompt(sample.question, image="").replace("\n", "", 1)
        return np.asarray(self.builder.tokenizer.encode(text, add_special_tokens=False).ids, np.int64)

    def batch(self, rows: Sequence[Sample] | Sequence[Sequence[Sample]]) -> Batch:
        """One row per sample, or per conversation (samples about one scene: the first is the
        single-turn prompt with the image, the others follow as later turns)."""
        import torch

        convs = [[r] if isinstance(r, Sample) else list(r) for r in rows]
        seqs, supervised = [], []
        for conv in convs:
            seq, sup = [], []
            for turn, sample in enumerate(conv):
                prompt = self.prompt_ids(sample)[0] if turn == 0 else self.turn_ids(sample)
                seq.extend(int(t) for t in prompt)
                for token in self.answer_ids(sample.answer):
                    sup.append((len(seq) - 1, token))     # the output at len-1 predicts the token
                    seq.append(token)
            seqs.append(seq[:-1])                         # the final EOS is a target, not an input
            supervised.append(sup)
        ids = np.full((len(seqs), max(map(len, seqs))), self.pad_id, np.int64)
        rows_, cols, targets = [], [], []
        for r, (seq, sup) in enumerate(zip(seqs, supervised)):
            ids[r, :len(seq)] = seq
            for col, token in sup:
                rows_.append(r)
                cols.append(col)
                targets.append(token)
        pixels = np.concatenate([self.pixels(conv[0]) for conv in convs])
        lengths = [len(self.answer_ids(s.answer)) for conv in convs for s in conv]
        aux = None
        if self.aux:
            from feather_export.quality.train_aux import batch_targets

            aux = batch_targets([conv[0] for conv in convs], self.grid)
        return Batch(torch.from_numpy(pixels), torch.from_numpy(ids), torch.tensor(rows_),
                     torch.tensor(cols), torch.tensor(targets), lengths, aux)


def vision_feature_states(model, pixel_values):
    """The vision tower's states at ``vision_feature_layer`` [B, 1 + N, dv] (CLS first), running
    only the layers up to it (transformers runs them all and discards the rest)."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers
    depth = model.config.vision_feature_layer % (len(layers) + 1)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in layers[:depth]:
        hidden = layer(hidden, None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def forward(model, batch: Batch):
    """Logits at the supervised positions [K, V], the feature-layer vision states [B, 1 + N, dv]
    and the LLM's image embeddings (the projector's output) [B, N, d].

    The same computation as ``LlavaForConditionalGeneration.forward`` (checked by the tests), but
    the vocabulary projection only where an answer token is predicted. Right padding needs no
    attention mask: the model is causal and pads come after every supervised position.
    """
    inner = model.model
    states = vision_feature_states(model, batch.pixel_values)
    image = inner.multi_modal_projector(states[:, 1:])
    lm = inner.language_model
    embeds = lm.embed_tokens(batch.input_ids)
    mask = (batch.input_ids == model.config.image_token_index).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
    hidden = lm(inputs_embeds=embeds).last_hidden_state
    logits = model.lm_head(hidden[batch.rows, batch.cols])
    return logits, states, image


def exact_match(logits, batch: Batch) -> np.ndarray:
    """Per answer: every answer token and the EOS are the argmax (= greedy decoding gives it)."""
    hits = (logits.argmax(-1) == batch.targets).cpu().numpy()
    out, k = [], 0
    for n in batch.answer_len:
        out.append(bool(hits[k:k + n].all()))
        k += n
    return np.asarray(out)


# ---- training --------------------------------------------------------------------------------

def _lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    floor = opts.min_lr_ratio
    return opts.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def evaluate_split(model, encoder: Encoder, samples: Sequence[Sample], batch_size: int = 64) -> dict:
    """Greedy-equivalent exact match (teacher forced, all answer tokens argmax) per question type."""
    import torch

    per_type: dict[str, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            batch = encoder.batch(chunk)
            logits, *_ = forward(model, batch)
            for s, ok in zip(chunk, exact_match(logits, batch)):
                per_type.setdefault(s.qtype, []).append(bool(ok))
    model.train()
    flat = [v for vs in per_type.values() for v in vs]
    return {"all": float(np.mean(flat)), **{k: float(np.mean(v)) for k, v in sorted(per_type.items())}}


VISION_STREAM = 10_000_000        # stage-1 images: train samples from this index on


def pretrain_vision(model, heads, encoder: "Encoder", opts: TrainOptions, say) -> dict:
    """Stage 1, the stand-in for CLIP pretraining: the vision tower alone learns the probes
    (no LLM in the loop, so a step costs a fraction of a full one)."""
    import torch

    from feather_export.quality.train_aux import aux_losses, batch_targets

    params = list(model.model.vision_tower.parameters()) + list(heads["scene"].parameters()) \
        + list(heads["vision"].parameters())
    optim = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.98), weight_decay=opts.weight_decay)
    t0, running = time.perf_counter(), {}
    for step in range(opts.vision_steps):
        for group in optim.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / opts.warmup)
        samples = make_samples("train", opts.batch_size, seed=opts.seed,
                               start=VISION_STREAM + step * opts.batch_size)
        pixels = torch.from_numpy(np.concatenate([encoder.pixels(s) for s in samples]))
        states = vision_feature_states(model, pixels)
        targets = batch_targets(samples, encoder.grid)
        losses = {k: v for k, v in aux_losses(heads, states, None, targets).items() if not k.startswith("llm.")}
        total = opts.cls_aux_weight * losses["scene"] + opts.patch_aux_weight * sum(
            v for k, v in losses.items() if k.startswith("vision."))
        optim.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        optim.step()
        for k, v in losses.items():
            running.setdefault(k, []).append(float(v.detach()))
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.vision_steps:
            means = {k: round(float(np.mean(v[-opts.eval_every:])), 4) for k, v in running.items()}
            say(f"vision step {step + 1:5d}/{opts.vision_steps}  " + " ".join(
                f"{k} {v:.3f}" for k, v in means.items() if k in ("scene", "vision.shape", "vision.centre"))
                + f"  {(time.perf_counter() - t0) / 60:.1f} min")
    return {"stage": "vision", "steps": opts.vision_steps, "aux_losses": means,
            "elapsed_s": round(time.perf_counter() - t0, 1)}


def _write_static_files(directory: Path, spec: ModelSpec) -> None:
    from feather_runtime.preprocess import write_preprocessor_config

    from feather_export.quality.tokenizer import save_shapes_tokenizer

    save_shapes_tokenizer(directory)
    write_preprocessor_config(directory, spec.image_size)


def save_untrained(out: str | os.PathLike, spec: ModelSpec = ModelSpec(), seed: int = 0) -> Path:
    """A randomly initialised checkpoint directory of this architecture (for plumbing tests)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FeatherError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    _write_static_files(out, spec)
    build_model(spec, seed).save_pretrained(out, safe_serialization=True)
    return out


def train(opts: TrainOptions, log: Callable[[str], None] | None = None) -> dict:
    """Train, save the checkpoint directory ``opts.out`` (atomically), return the training report."""
    import torch

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(opts.out)
    if out.exists() and any(out.iterdir()):
        raise FeatherError(f"--out {out} exists and is not empty; choose a new directory")
    if opts.steps < 1 or opts.batch_size < 1 or opts.turns < 1 or opts.vision_steps < 0:
        raise FeatherError("--steps, --batch-size and --turns must be at least 1, --vision-steps >= 0")
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        with staged_dir(out) as tmp:
            if opts.threads:
                torch.set_num_threads(opts.threads)
            torch.use_deterministic_algorithms(True, warn_only=True)
            _write_static_files(tmp, opts.spec)
            model = build_model(opts.spec, opts.seed)
            use_aux = max(opts.cls_aux_weight, opts.patch_aux_weight, opts.llm_aux_weight) > 0
            encoder = Encoder(tmp, model.config.image_seq_length, aux=use_aux)
            heads = make_heads(opts.spec.vision_hidden, opts.spec.hidden, encoder.grid)
            params = list(model.parameters()) + (list(heads.parameters()) if use_aux else [])
            weights = {"scene": opts.cls_aux_weight, "vision": opts.patch_aux_weight,
                       "llm": opts.llm_aux_weight}
            decay = [p for p in params if p.dim() >= 2]
            no_decay = [p for p in params if p.dim() < 2]
            optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=opts.lr, betas=(0.9, 0.98), eps=1e-8)
            val = make_samples(EVAL_SPLIT, opts.eval_n, seed=opts.seed)
            n_params = sum(p.numel() for p in model.parameters())
            say(f"tiny-shapes: {n_params / 1e6:.2f} M parameters, {model.config.image_seq_length} image "
                f"tokens, {opts.steps} steps x {opts.batch_size} samples, {torch.get_num_threads()} threads")
            history = []
            t0 = time.perf_counter()
            model.train()
            if opts.vision_steps:
                history.append(pretrain_vision(model, heads, encoder, opts, say))
            running, running_aux = [], {}
            best = None                     # (val accuracy, step, state dict) with keep_best
            for step in range(opts.steps):
                start = step * opts.batch_size
                batch = encoder.batch([make_conversation("train", start + j, opts.seed, opts.turns,
                                                         opts.turn_weights)
                                       for j in range(opts.batch_size)])
                for group in optim.param_groups:
                    group["lr"] = _lr_at(step, opts)
                logits, states, image = forward(model, batch)
                loss = torch.nn.functional.cross_entropy(logits, batch.targets)
                total = loss
                if use_aux:
                    aux = aux_losses(heads, states, image, batch.aux)
                    total = loss + sum(weights[k.split(".")[0]] * v for k, v in aux.items())
                    for k, v in aux.items():
                        running_aux.setdefault(k, []).append(float(v.detach()))
                optim.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
                optim.step()
                running.append(float(loss.detach()))
                last = step + 1 == opts.steps
                if (step + 1) % opts.eval_every == 0 or last:
                    acc = evaluate_split(model, encoder, val)
                    elapsed = time.perf_counter() - t0
                    entry = {"step": step + 1, "loss": float(np.mean(running)),
                             "aux_losses": {k: round(float(np.mean(v)), 4) for k, v in running_aux.items()},
                             "val": acc, "elapsed_s": round(elapsed, 1)}
                    history.append(entry)
                    running, running_aux = [], {}
                    types = " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "all")
                    aux_s = " ".join(f"{k} {v:.3f}" for k, v in entry["aux_losses"].items()
                                     if k in ("scene", "vision.shape", "llm.shape", "llm.centre"))
                    say(f"step {step + 1:5d}/{opts.steps}  loss {entry['loss']:.4f}  val {acc['all']:.3f} "
                        f"({types})  aux [{aux_s}]  lr {_lr_at(step, opts):.2e}  {elapsed / 60:.1f} min")
                    if opts.keep_best and (best is None or acc["all"] > best[0]):
                        best = (acc["all"], step + 1,
                                {k: v.detach().clone() for k, v in model.state_dict().items()})
                    if opts.snapshots:      # the latest weights, loadable beside the static files
                        model.save_pretrained(tmp, safe_serialization=True)
            wall = time.perf_counter() - t0
            model.eval()
            if best is not None:
                model.load_state_dict(best[2])
                say(f"keeping the weights of step {best[1]} (val {best[0]:.3f})")
            model.save_pretrained(tmp, safe_serialization=True)
            report = {"options": {k: v for k, v in asdict(opts).items() if k != "out"},
                      "parameters": n_params, "wall_time_s": round(wall, 1),
                      "threads": torch.get_num_threads(), "torch": torch.__version__,
                      "saved_step": best[1] if best is not None else opts.steps,
                      "saved_val": best[0] if best is not None else history[-1]["val"]["all"],
                      "history": history}
            (tmp / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    say(f"wrote {out} in {wall / 60:.1f} min")
    return report


def build_parser() -> argparse.ArgumentParser:
    d = TrainOptions(out="")
    p = argparse.ArgumentParser(prog="python -m feather_export.quality.train",
                                description="Train the tiny-shapes LLaVA on the synthetic task (CPU).")
    p.add_argument("--out", required=True, help="checkpoint directory to write (new or empty)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--cls-aux-weight", type=float, default=d.cls_aux_weight,
                   help="weight of the CLS scene-contents probe loss (0 disables it)")
    p.add_argument("--patch-aux-weight", type=float, default=d.patch_aux_weight,
                   help="weight of the per-patch probe losses at the vision feature layer (0: off)")
    p.add_argument("--llm-aux-weight", type=float, default=d.llm_aux_weight,
                   help="weight of the per-patch probe losses on the LLM's image embeddings (0: off)")
    p.add_argument("--turns", type=int, default=d.turns,
                   help="questions per training image, as a multi-turn conversation (1: single-turn)")
    p.add_argument("--turn-weights", default=",".join(map(str, d.turn_weights)),
                   help="colour,count,where weights of the question types of the extra turns")
    p.add_argument("--vision-steps", type=int, default=d.vision_steps,
                   help="stage-1 steps training the vision tower alone on the probes (0: none)")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--keep-last", action="store_true",
                   help="save the last step's weights instead of the best validation evaluation's")
    p.add_argument("--snapshots", action="store_true",
                   help="save the weights at every evaluation into the partial output directory")
    p.add_argument("--eval-n", type=int, default=d.eval_n)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads (0: default)")
    p.add_argument("--hidden", type=int, default=d.spec.hidden, help="decoder width")
    p.add_argument("--heads", type=int, default=d.spec.heads, help="decoder attention heads (= KV heads)")
    p.add_argument("--intermediate", type=int, default=d.spec.intermediate, help="decoder MLP width")
    p.add_argument("--rope-theta", type=float, default=d.spec.rope_theta)
    return p


def _weights(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0:
        raise FeatherError(f"--turn-weights {text!r}: give three non-negative numbers, e.g. 0.4,0.4,0.2")
    return values


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = replace(ModelSpec(), hidden=args.hidden, heads=args.heads, kv_heads=args.heads,
                       intermediate=args.intermediate, rope_theta=args.rope_theta)
        train(TrainOptions(out=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                           lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                           cls_aux_weight=args.cls_aux_weight, patch_aux_weight=args.patch_aux_weight,
                           llm_aux_weight=args.llm_aux_weight,
                           turns=args.turns, turn_weights=_weights(args.turn_weights),
                           eval_every=args.eval_every, eval_n=args.eval_n, threads=args.threads,
                           snapshots=args.snapshots, keep_best=not args.keep_last,
                           vision_steps=args.vision_steps,
                           spec=spec))
    except FeatherError as exc:
        print(f"train_tiny: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
