"""``feather.json``: the artifact manifest (docs/design.md §2). Read and verified here, written by the exporter.

The manifest is written last and atomically; an artifact directory without one is incomplete.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import FeatherError

MANIFEST_NAME = "feather.json"
FORMAT = "feather-export"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Segment:
    name: str
    kind: str                 # vision | embed | decoder | select
    file: str                 # relative to the artifact directory
    sha256: str
    inputs: tuple[dict, ...]  # {"name", "shape", "dtype"}
    outputs: tuple[dict, ...]
    layers: tuple[int, int] | None = None      # decoder spans: [start, end)
    stage: int | None = None                   # select segments: index into prune stages
    data_files: tuple[dict, ...] = ()          # external data: {"file", "sha256"}

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if v is not None}
        for key in ("inputs", "outputs", "data_files"):
            d[key] = list(d[key])
        if self.layers is not None:
            d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Segment":
        d = dict(d)
        d["inputs"], d["outputs"] = tuple(d["inputs"]), tuple(d["outputs"])
        d["data_files"] = tuple(d.get("data_files", ()))
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict

    @property
    def segments(self) -> list[Segment]:
        return [Segment.from_dict(s) for s in self.data["segments"]]

    def segment(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise FeatherError(f"{self.root}: the manifest has no segment {name!r}")

    def __getitem__(self, key):
        return self.data[key]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(root: Path, data: dict) -> None:
    """Write ``feather.json`` atomically (temp file + rename)."""
    tmp = root / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST_NAME)


def load_manifest(root: str | os.PathLike, verify: bool = True) -> Manifest:
    """Read the manifest and check it against the files; refuse any mismatch with a clear message.

    ``verify`` hashes every file (sha256); without it only presence and sizes are checked.
    """
    root = Path(root)
    if not root.is_dir():
        raise FeatherError(f"artifact directory {root} does not exist; build one with "
                           "`feather-export build --out DIR`")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FeatherError(f"{root} has no {MANIFEST_NAME}: the artifact is incomplete "
                           "(an export that failed or was interrupted); build it again")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeatherError(f"{path} is not valid JSON ({exc}); build the artifact again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FeatherError(f"{path} is not a feather-export manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise FeatherError(
            f"{root} was built with manifest format {data.get('format_version')} by feather-export "
            f"{data.get('tools', {}).get('feather_export', '?')}; this runtime reads format "
            f"{FORMAT_VERSION}. Rebuild the artifact with this version")
    manifest = Manifest(root, data)
    for seg in manifest.segments:
        files = [{"file": seg.file, "sha256": seg.sha256}, *seg.data_files]
        for entry in files:
            _check_file(root, entry, verify)
    for entry in data.get("files", []):
        _check_file(root, entry, verify)
    return manifest


def _check_file(root: Path, entry: dict, verify: bool) -> None:
    file = root / entry["file"]
    if not file.is_file():
        raise FeatherError(f"{root}: {entry['file']} is missing; the artifact is incomplete")
    if "size" in entry and file.stat().st_size != entry["size"]:
        raise FeatherError(f"{root}: {entry['file']} has changed size since it was built "
                           "(tampered or corrupted); build the artifact again")
    if verify and sha256_file(file) != entry["sha256"]:
        raise FeatherError(f"{root}: {entry['file']} does not match its hash in {MANIFEST_NAME} "
                           "(tampered or corrupted); build the artifact again")
