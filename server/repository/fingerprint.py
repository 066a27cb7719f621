"""Fingerprints of model folders (file names, sizes, mtimes): did a folder change on disk, and where?

A fingerprint splits a model folder into its version folders and everything else (config.pbtxt,
labels, warmup data), so a change can be traced to one version or to the whole model. Contents are
not hashed: reading every model file on every poll would cost more than the poll itself, and a copy
in progress always changes a size or an mtime.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

Entry = tuple[str, int, int]  # (path relative to the folder, size, mtime_ns); directories: size -1
Tree = tuple[Entry, ...]


@dataclass(frozen=True)
class ModelPrint:
    """What a model folder held when it was looked at."""

    common: Tree  # everything outside the numeric version folders
    versions: dict[int, Tree] = field(default_factory=dict)

    def stamp(self, version: int) -> tuple[Tree, Tree | None]:
        """What a loaded version depends on: the model-level files and its own folder."""
        return self.common, self.versions.get(version)


def _is_version(name: str) -> bool:
    return name.isdigit() and not (len(name) > 1 and name.startswith("0"))


def _entry(path: Path, rel: str) -> Entry | None:
    try:
        st = path.stat()
    except OSError:  # removed while we looked: the next look sees the difference
        return None
    return (rel, -1 if path.is_dir() else st.st_size, 0 if path.is_dir() else st.st_mtime_ns)


def _tree(root: Path, prefix: str = "") -> list[Entry]:
    out: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        base = prefix if rel == "." else f"{prefix}{rel}/"
        for name in dirnames:
            out.append((f"{base}{name}/", -1, 0))
        for name in sorted(filenames):
            entry = _entry(Path(dirpath, name), base + name)
            if entry is not None:
                out.append(entry)
    return out


def model_print(folder: Path | None) -> ModelPrint | None:
    """The folder's fingerprint, or None when it does not exist (any more)."""
    if folder is None:
        return None
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return None
    common: list[Entry] = []
    versions: dict[int, Tree] = {}
    for child in children:
        if child.is_dir() and _is_version(child.name):
            versions[int(child.name)] = tuple(_tree(child))
        elif child.is_dir():
            common.append((f"{child.name}/", -1, 0))
            common += _tree(child, f"{child.name}/")
        else:
            entry = _entry(child, child.name)
            if entry is not None:
                common.append(entry)
    return ModelPrint(tuple(common), versions)
