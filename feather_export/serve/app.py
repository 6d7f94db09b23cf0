"""Starting the serving application: a typed ``ServeConfig`` (checked before Ray starts), the
bound Ray Serve application, and start/stop on a local or an existing Ray cluster."""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from feather_export.errors import FeatherError

APP_NAME = "feather"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class ServeConfig:
    artifact: Path
    replicas: int = 1
    address: str | None = None           # None: start a local Ray cluster
    host: str = "127.0.0.1"
    port: int = 8000
    image_root: Path | None = None       # None: requests must carry the image as a data URL
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    model_name: str | None = None        # None: the artifact's model id
    backend: str | None = None           # feather_runtime backend name (None: what is installed)
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None    # None: 1 where the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise FeatherError(f"--replicas must be at least 1, got {self.replicas}")
        if not 0 < self.port < 65536:
            raise FeatherError(f"--port must be in 1..65535, got {self.port}")
        if self.max_image_pixels < 1:
            raise FeatherError(f"--max-image-pixels must be positive, got {self.max_image_pixels}")
        if self.cpus_per_replica < 0 or (self.gpus_per_replica or 0) < 0:
            raise FeatherError("--cpus-per-replica and --gpus-per-replica must be >= 0")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise FeatherError(f"--image-root {self.image_root} is not a directory")


def check_artifact(config: ServeConfig) -> str:
    """Open the manifest (fast, before Ray starts); returns the served model name."""
    from feather_runtime.manifest import load_manifest

    manifest = load_manifest(config.artifact, verify=False)
    return config.model_name or manifest["model"]["id"]


def build_app(config: ServeConfig, num_gpus: float):
    """The Ray Serve application: ``config.replicas`` model replicas behind one ingress."""
    from feather_export.serve.deployment import FeatherModel, OpenAIIngress

    threads = max(1, math.floor(config.cpus_per_replica)) if config.cpus_per_replica else None
    model = FeatherModel.options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": num_gpus},
    ).bind(str(Path(config.artifact).resolve()), config.backend, threads)
    root = None if config.image_root is None else str(Path(config.image_root).resolve())
    return OpenAIIngress.bind(model, str(Path(config.artifact).resolve()), check_artifact(config),
                              config.max_image_pixels, root)


def start(config: ServeConfig, ray_init_kwargs: dict | None = None) -> str:
    """Connect to (or start) Ray, deploy the application, wait until it answers; returns its URL."""
    model_name = check_artifact(config)
    import ray
    from ray import serve

    if not ray.is_initialized():
        kwargs = {"include_dashboard": False, **(ray_init_kwargs or {})}
        ray.init(address=config.address, **kwargs)
    num_gpus = config.gpus_per_replica
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    serve.start(http_options={"host": config.host, "port": config.port})
    try:
        serve.run(build_app(config, num_gpus), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as exc:
        raise FeatherError(f"the serving application did not start: {exc}"[:2000]) from None
    url = f"http://{config.host}:{config.port}"
    return f"{url} (model {model_name!r}, {config.replicas} replica(s), {num_gpus:g} GPU each)"


def stop(local: bool) -> None:
    """Remove the application; shut Ray down too if this process started it."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    try:
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
    finally:
        ray.shutdown()


def serve_forever(config: ServeConfig, say=print) -> None:
    """Serve until Ctrl-C or SIGTERM, then remove the application (and the local Ray instance)."""
    try:
        url = start(config)
        # after ray.init, which installs its own SIGTERM handler (it logs and kills the process
        # before the cleanup below could run)
        signal.signal(signal.SIGTERM, _exit)
        signal.signal(signal.SIGINT, signal.default_int_handler)   # even if started ignoring it
        say(f"serving on {url}; Ctrl-C stops it")
        while True:
            time.sleep(3600)
    finally:
        stop(local=config.address is None)


def _exit(signum, frame) -> None:
    raise SystemExit(128 + signum)
