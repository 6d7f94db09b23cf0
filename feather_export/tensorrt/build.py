"""Build TensorRT engines for an artifact (``feather-export build --backend tensorrt``).

One engine per segment, with the optimization profiles of ``trt_profiles`` (prefill and decode in
one engine, so the weights exist once), written to ``<artifact>/engines/`` and recorded in
``engines/engines.json``; ``feather.json`` is not modified. Engines already built with the same
key (ONNX hash, precision, profiles, TensorRT version, GPU, plugin hash, builder options) are
reused, from this artifact or from the ``reuse_from`` artifacts (e.g. the same model exported for
another budget: vision, embed and the spans before the first prune point match).

The build goes through polygraphy's loaders (``polygraphy.backend.trt``): ``NetworkFromOnnxPath``
(``strongly_typed``), ``CreateConfig`` (``profiles``, ``fp16``/``bf16``, ``tf32``,
``memory_pool_limits``) and ``EngineBytesFromNetwork``. The timing cache is loaded into and saved
from the builder config here (``timing_cache.py`` says why not through polygraphy's paths).
``EngineBytesFromNetwork`` rather than ``EngineFromNetwork`` + ``SaveEngine``: the engine is
serialized once and written straight to disk, never deserialized in the build process, which
matters on Jetson where the GPU shares the host's DRAM. The plugin library is registered with
``trt.get_plugin_registry().load_library`` (polygraphy's ``LoadPlugins`` uses ``ctypes.CDLL``,
a plain dlopen that registers nothing for a library exporting only ``getCreators``).

TensorRT generations: 10.3+ builds strongly typed (the artifact's dtype) or weakly typed
(``--precision fp16|bf16`` on an fp32 artifact, with the FP16/BF16 builder flags). TensorRT 11
removed those flags (networks are always strongly typed), so there the precision is the
artifact's dtype and a different ``--precision`` is refused before anything is built.

Nothing here imports tensorrt at module import time. Without TensorRT, ``build_engines`` raises
``FeatherError``.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

from feather_runtime.manifest import load_manifest, sha256_file

from feather_export.errors import FeatherError
from feather_export.tensorrt.plans import (ENGINES_DIR, TIMING_CACHE_NAME, EngineIndex, EnginePlan,
                                           format_command, plan_engines)
from feather_export.tensorrt.timing_cache import TimingCacheFile

MIN_TENSORRT = (10, 3)
PLUGIN_OVERRIDE_TENSORRT = (10, 7)   # from 10.7 the ONNX parser prefers a registered plugin
STRONGLY_TYPED_ONLY_TENSORRT = (11,)  # TensorRT 11: no FP16/BF16 builder flags
TIE_ORDER_NOTE = (
    "SelectTokens runs as its function body here (TensorRT's own TopK): TensorRT does not document "
    "the order among equal scores, so on exact ties it may keep other tokens than ONNX Runtime and "
    "the reference (lower index first). Scores rarely tie exactly; for the documented order export "
    "with --trt-plugin-only and build with --plugin (docs/tensorrt.md)")


def build_engines(artifact_dir, precision: str | None = None, plugin_library=None, timing_cache=None,
                  progress: Callable[[str], None] = print, *, workspace_mib: int | None = None,
                  reuse_from: Iterable = (), tf32: bool = False) -> list[Path]:
    """Build (or reuse) one engine per segment of the artifact; returns the engine paths.

    ``precision``: None = the artifact's dtype (strongly typed); fp16/bf16 on an fp32 artifact =
    weakly typed with that builder flag (TensorRT 10.x; refused on 11, which has no such flags).
    ``plugin_library``: ``libfeather_plugin.so``, needed for artifacts exported with
    ``--trt-plugin-only``. ``timing_cache``: default ``engines/timing.cache`` (loaded if present,
    updated after every engine; missing directories are created).
    ``workspace_mib``: builder workspace pool limit (Jetson: keep it below free DRAM).
    """
    root = Path(artifact_dir)
    trt = _import_tensorrt()
    manifest = load_manifest(root)
    plans = plan_engines(manifest.data, precision, strongly_typed_only=_strongly_typed_only(trt))
    engines_dir = root / ENGINES_DIR
    cache = TimingCacheFile(timing_cache if timing_cache is not None
                            else engines_dir / TIMING_CACHE_NAME)
    cache.prepare()                            # before anything is built or written
    timing_cache = cache.path
    engines_dir.mkdir(exist_ok=True)
    device = _device_identity()
    plugin = _prepare_plugin(trt, manifest.data, plans, plugin_library, progress)
    index = EngineIndex.load(engines_dir)
    others = [(Path(d), EngineIndex.load(Path(d) / ENGINES_DIR)) for d in reuse_from]
    builder = {"tf32": bool(tf32), "workspace_mib": workspace_mib}
    progress(f"building {len(plans)} TensorRT engines ({plans[0].precision}"
             f"{', strongly typed' if plans[0].strongly_typed else ', weakly typed'}) with TensorRT "
             f"{trt.__version__} on {device['name']} (sm_{device['compute_capability'].replace('.', '')})")
    paths = []
    tie_note_shown = False
    for i, plan in enumerate(plans, 1):
        env = {"tensorrt": trt.__version__, "device": device, "builder": builder,
               "plugin_sha256": plugin["sha256"] if plan.uses_select_op and plugin else None}
        key = plan.key(env)
        command = format_command(plan.trtexec_command(
            root, plugin_library=plugin["path"] if plugin else None, timing_cache=timing_cache,
            workspace_mib=workspace_mib, tf32=tf32))
        progress(f"[{i}/{len(plans)}] {plan.segment} -> {plan.engine} "
                 f"({len(plan.profiles)} profile{'s' if len(plan.profiles) != 1 else ''})")
        progress(f"  equivalent: {command}")
        existing = index.find(plan.segment, plan.precision)
        if index.is_current(existing, key, root):
            progress("  up to date (same key), kept")
            paths.append(root / plan.engine)
            tie_note_shown = _tie_note(plan, existing, tie_note_shown, progress)
            continue
        entry = _reuse(plan, key, root, others, progress)
        if entry is None:
            t0 = time.perf_counter()
            uses_plugin = _compile_to_file(trt, root, plan, plugin is not None, cache,
                                           workspace_mib, tf32, progress)
            seconds = time.perf_counter() - t0
            entry = {"build_seconds": round(seconds, 3), "reused_from": None,
                     "uses_plugin": uses_plugin}
            progress(f"  built in {seconds:.1f} s"
                     + (" (SelectTokens runs as the plugin)" if uses_plugin else ""))
        file = root / plan.engine
        entry.update({
            "segment": plan.segment, "kind": plan.kind, "precision": plan.precision,
            "file": plan.engine, "sha256": sha256_file(file), "size": file.stat().st_size,
            "key": key, "onnx_sha256": plan.onnx_sha256, "strongly_typed": plan.strongly_typed,
            "budget_dependent": plan.budget_dependent,
            "profiles": [p.to_dict() for p in plan.profiles],
            "tensorrt": trt.__version__, "device": device, "builder": builder,
            "plugin": plugin if plan.uses_select_op else None, "trtexec": command})
        index.put(entry)
        index.save()                           # finished engines survive an interrupted build
        paths.append(file)
        tie_note_shown = _tie_note(plan, entry, tie_note_shown, progress)
    index.data["default_precision"] = plans[0].precision
    index.save()
    progress(f"wrote {len(paths)} engines to {engines_dir} (index {engines_dir / 'engines.json'})")
    return paths


def _tie_note(plan: EnginePlan, entry: dict, shown: bool, progress) -> bool:
    """Say once per build that a select engine runs the function body (TensorRT's TopK)."""
    if plan.uses_select_op and not entry.get("uses_plugin") and not shown:
        progress(f"  note: {TIE_ORDER_NOTE}")
        return True
    return shown


# ---- steps (module-level functions so tests can replace the TensorRT-bound ones) --------------

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise FeatherError("building TensorRT engines needs TensorRT >= 10.3 with its Python "
                           "bindings (pip install 'feather-export[trt]' on an NVIDIA machine with a "
                           "CUDA 12 driver, 'feather-export[trt-cu13]' with a CUDA 13 driver; on "
                           f"Jetson the JetPack packages); it is not importable here ({exc})") from None
    if _version_tuple(trt.__version__) < MIN_TENSORRT:
        raise FeatherError(f"TensorRT {trt.__version__} is too old; feather-export needs >= "
                           f"{'.'.join(map(str, MIN_TENSORRT))}")
    return trt


def _strongly_typed_only(trt) -> str | None:
    """The TensorRT version when it builds strongly typed networks only (11+: the FP16/BF16
    builder flags are gone; ``BuilderFlag`` in NvInfer.h of v11 starts at kDEBUG), else None."""
    flags = getattr(trt, "BuilderFlag", None)
    if _version_tuple(trt.__version__) >= STRONGLY_TYPED_ONLY_TENSORRT or \
            (flags is not None and not hasattr(flags, "FP16")):
        return trt.__version__
    return None


def _device_identity() -> dict:
    from feather_runtime.backends.tensorrt import device_identity

    return device_identity()


def _prepare_plugin(trt, manifest: dict, plans: list[EnginePlan], plugin_library, progress):
    """Load the plugin library when given; refuse a plugin-only artifact without it."""
    from feather_runtime.backends.tensorrt import load_plugin_library

    has_select = any(p.uses_select_op for p in plans)
    plugin_only = bool(manifest.get("trt_plugin_only"))
    if plugin_library is None:
        if has_select and plugin_only:
            raise FeatherError("this artifact was exported with --trt-plugin-only (no function body "
                               "for feather::SelectTokens); pass the plugin library "
                               "(engines/plugin README: libfeather_plugin.so)")
        if has_select:
            progress("SelectTokens: no plugin library given, the ONNX parser imports the op's "
                     "function body (standard TensorRT layers)")
        return None
    path = Path(plugin_library).resolve()
    load_plugin_library(trt, path)
    if has_select and not plugin_only and _version_tuple(trt.__version__) < PLUGIN_OVERRIDE_TENSORRT:
        progress(f"SelectTokens: TensorRT {trt.__version__} (< 10.7) inlines a local function of the "
                 "same name before trying plugins, so the plugin is not used; export with "
                 "--trt-plugin-only to use it")
    return {"path": str(path), "sha256": sha256_file(path)}


def _reuse(plan: EnginePlan, key: str, root: Path, others, progress) -> dict | None:
    """Copy an engine with the same key from another artifact (hard link when possible)."""
    for other_root, other in others:
        entry = other.find_key(key)
        if entry is None or not other.is_current(entry, key, other_root):
            continue
        source, target = other_root / entry["file"], root / plan.engine
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        progress(f"  reused {source} (same key)")
        return {"build_seconds": 0.0, "reused_from": str(source),
                "uses_plugin": entry.get("uses_plugin", False)}
    return None


def _compile_to_file(trt, root: Path, plan: EnginePlan, plugin_loaded: bool, cache: TimingCacheFile,
                     workspace_mib: int | None, tf32: bool, progress=print) -> bool:
    """Parse, build and write one engine atomically; returns whether the plugin is in it. The
    timing cache is read before and merged/saved after the build (a cache that cannot be saved
    costs a warning, never the engine)."""
    from polygraphy.backend.trt import (CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath,
                                        Profile)
    from polygraphy.exception import PolygraphyException

    target = root / plan.engine
    tmp = target.with_name(f".{target.name}.partial")
    try:
        builder, network, parser = NetworkFromOnnxPath(str(root / plan.onnx),
                                                       strongly_typed=plan.strongly_typed)()
        uses_plugin = any(network.get_layer(i).type == trt.LayerType.PLUGIN_V3
                          for i in range(network.num_layers))
        profiles = []
        for p in plan.profiles:
            profile = Profile()
            for name, r in p.shapes:
                profile.add(name, min=r.min, opt=r.opt, max=r.max)
            profiles.append(profile)
        pools = ({trt.MemoryPoolType.WORKSPACE: int(workspace_mib) << 20}
                 if workspace_mib is not None else None)
        # fp16/bf16 only for weakly typed builds, which plan_engines never plans on TensorRT 11
        config = CreateConfig(profiles=profiles or None, tf32=tf32,
                              fp16=not plan.strongly_typed and plan.precision == "fp16",
                              bf16=not plan.strongly_typed and plan.precision == "bf16",
                              memory_pool_limits=pools)(builder, network)
        _load_timing_cache(config, cache, progress)
        serialized = EngineBytesFromNetwork((builder, network, parser), config=config)()
        with open(tmp, "wb") as f:
            f.write(serialized)              # IHostMemory supports the buffer protocol: no copy
        del serialized
        os.replace(tmp, target)
    except PolygraphyException as exc:
        tmp.unlink(missing_ok=True)
        raise FeatherError(f"TensorRT could not build {plan.segment} from {plan.onnx}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _save_timing_cache(config, cache, progress)
    return uses_plugin


def _load_timing_cache(config, cache: TimingCacheFile, progress) -> None:
    """Start from the cache on disk; one from another TensorRT or GPU is ignored (with a note)."""
    data = cache.read()
    if data is None:
        return
    try:
        ok = config.set_timing_cache(config.create_timing_cache(data), ignore_mismatch=False)
    except Exception as exc:  # noqa: BLE001 - TensorRT raises its own types for a bad blob
        ok, why = False, f" ({exc})"
    else:
        why = ""
    if not ok:
        progress(f"  timing cache {cache.path} was written by another TensorRT version or GPU, or is "
                 f"damaged{why}; building without it (it is replaced after this build)")


def _save_timing_cache(config, cache: TimingCacheFile, progress) -> None:
    timing = config.get_timing_cache()
    if timing is None:
        return

    def merged(previous: bytes | None) -> bytes:
        if previous is not None:             # another build may have saved since we loaded it
            try:                             # (not ignore_mismatch: another GPU's cache is replaced)
                timing.combine(config.create_timing_cache(previous), False)
            except Exception:  # noqa: BLE001 - a damaged file is simply replaced
                pass
        return bytes(memoryview(timing.serialize()))

    try:
        cache.save(merged)
    except FeatherError as exc:
        progress(f"  warning: {exc}; the engine is kept, the next build times tactics again")


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def main(argv: list[str] | None = None) -> int:
    """``python -m feather_export.tensorrt.build ARTIFACT``: engines for an existing artifact (e.g. one
    exported on a workstation and copied to a Jetson). Interim entry until the CLI wires it."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m feather_export.tensorrt.build",
                                description="Build TensorRT engines for a feather-export artifact.")
    p.add_argument("artifact")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                   help="default: the artifact's dtype, strongly typed")
    p.add_argument("--plugin", help="path to libfeather_plugin.so")
    p.add_argument("--timing-cache", help="default: ARTIFACT/engines/timing.cache")
    p.add_argument("--workspace", type=int, metavar="MIB", help="builder workspace limit in MiB")
    p.add_argument("--reuse-engines", action="append", default=[], metavar="ARTIFACT",
                   help="take engines with the same key from this artifact (repeatable)")
    args = p.parse_args(argv)
    try:
        build_engines(args.artifact, args.precision, args.plugin, args.timing_cache,
                      progress=lambda m: print(m, file=sys.stderr, flush=True),
                      workspace_mib=args.workspace, reuse_from=args.reuse_engines)
    except FeatherError as exc:
        print(f"feather-export: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
