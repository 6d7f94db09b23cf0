"""``feather-export serve``: the command-line edge of ``feather_export.serve.app``.

Parses the flags into a ``ServeConfig`` (checked before Ray starts) and serves until Ctrl-C.
Needs the ``serve`` extra (``pip install 'feather-export[serve]'``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from feather_export.errors import FeatherError


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    from feather_export.serve.app import DEFAULT_MAX_IMAGE_PIXELS

    p = subparsers.add_parser(
        "serve", help="serve an artifact behind an OpenAI-compatible HTTP API on Ray Serve",
        description="POST /v1/chat/completions (one user message: text + one image_url, a base64 "
                    "data URL or a path under --image-root), GET /v1/models, GET /health. One "
                    "Pipeline per replica, one request at a time per replica. Runs until Ctrl-C.")
    p.add_argument("artifact", metavar="OUT", help="artifact directory (feather-export build)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    p.add_argument("--address", metavar="RAY_ADDRESS",
                   help="an existing Ray cluster, e.g. ray://head:10001 or auto (default: start "
                        "a local Ray instance, or $RAY_ADDRESS when set); the artifact must be at "
                        "the same path on every node")
    p.add_argument("--host", default="127.0.0.1",
                   help="HTTP host to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--image-root", metavar="DIR",
                   help="image_url may be a path under DIR (default: none; data URLs only)")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"largest image accepted, width x height (default {DEFAULT_MAX_IMAGE_PIXELS})")
    p.add_argument("--model-name", help="the model name clients send (default: the artifact's "
                                        "model id, e.g. tiny-shapes)")
    p.add_argument("--backend", help="onnxruntime (default: CUDA when onnxruntime-gpu is "
                   "installed), onnxruntime-cpu, onnxruntime-cuda, openvino, openvino-bf16, "
                   "openvino-f32, auto (the fastest here), tensorrt")
    p.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="Ray CPUs per replica; also ONNX Runtime's threads (default 1)")
    p.add_argument("--gpus-per-replica", type=float,
                   help="Ray GPUs per replica (default: 1 where the cluster has GPUs, else 0)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    from feather_export.serve.app import ServeConfig, check_artifact, serve_forever

    config = ServeConfig(artifact=Path(args.artifact), replicas=args.replicas,
                         address=args.address, host=args.host, port=args.port,
                         image_root=Path(args.image_root) if args.image_root else None,
                         max_image_pixels=args.max_image_pixels, model_name=args.model_name,
                         backend=args.backend, cpus_per_replica=args.cpus_per_replica,
                         gpus_per_replica=args.gpus_per_replica)
    check_artifact(config)                     # a bad artifact is refused before Ray starts
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise FeatherError(f"serve needs the serve extra ({exc.name} is missing): "
                           "pip install 'feather-export[serve]'") from None
    serve_forever(config, say=lambda m: print(m, file=sys.stderr, flush=True))
    return 0
