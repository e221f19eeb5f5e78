"""The data files of a run crate: the published outputs and the inputs from outside the job, each hashed
(sha256) once, and either referenced where they are (a ``file://`` URI: the default, so a crate of a big
run costs its metadata and the reading of its files, not a copy of them) or copied into the crate (a
relative id: a crate that can be moved and archived whole)."""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import mimetypes
import os
import posixpath
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmbagent_batch.provenance.graph import GraphWriter
from cmbagent_batch.rundir.layout import Layout

_CHUNK = 1 << 20

Matches = Sequence[tuple[str, Sequence[tuple[str, str]]]]  # each declared input, with its (producer, path) pairs


def sha256_of(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


class DataFiles:
    """Describes each file once in the crate ``writer`` writes, and gives its id."""

    def __init__(self, writer: GraphWriter, crate_dir: str, layout: Layout, spec_dir: str, copy: bool) -> None:
        self.writer = writer
        self.crate_dir = crate_dir
        self.layout = layout
        self.spec_dir = spec_dir
        self.copy = copy
        self.count = 0
        self.hashed_bytes = 0
        self.external: list[str] = []  # the ids of the inputs from outside the job
        self._ids: dict[str, str] = {}  # absolute path -> id
        self._published: dict[str, list[str]] = {}  # producer -> its published files (relative), once read

    def in_crate(self, place: str, name: str) -> str:
        """The id of a file written into the crate, described."""
        return self.describe(os.path.join(self.crate_dir, *place.split("/")), place, name, inside=True)

    def describe(self, path: str, place: str, name: str, inside: bool = False) -> str:
        """The id of the file at ``path``, described (hashed, and copied to ``place`` in the crate when
        copying) the first time it is asked for."""
        known = self._ids.get(path)
        if known is not None:
            return known
        digest, size = sha256_of(path), os.path.getsize(path)
        if inside:
            file_id = place
        elif self.copy:
            target = os.path.join(self.crate_dir, *place.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(path, target)
            file_id = place
        else:
            file_id = Path(path).as_uri()
        entity: dict[str, Any] = {"@id": file_id, "@type": "File", "name": name, "contentSize": size,
                                  "sha256": digest,
                                  "encodingFormat": mimetypes.guess_type(path)[0] or "application/octet-stream"}
        if not (self.copy or inside):
            entity["description"] = "referenced where the run left it (not copied into the crate)"
        self.writer.add(entity)
        self._ids[path] = file_id
        self.count += 1
        self.hashed_bytes += size
        return file_id

    def published(self, task_id: str) -> list[str]:
        """The task's published files, relative to RUN_DIR/outputs/S/TASK, sorted."""
        known = self._published.get(task_id)
        if known is None:
            root = self.layout.published(task_id)
            known = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)
            self._published[task_id] = known
        return known

    def outputs(self, task_id: str) -> list[str]:
        """The ids of the task's published outputs."""
        root = self.layout.published(task_id)
        place = "outputs/" + self.layout.place(task_id).replace(os.sep, "/")
        return [self.describe(os.path.join(root, rel), f"{place}/{_posix(rel)}", f"{task_id}: {_posix(rel)}")
                for rel in self.published(task_id)]

    def inputs(self, matches: Matches) -> list[str]:
        """The ids of the files a task's declared inputs are: a producer's published outputs, or files
        beside the spec (as the run links them in: ``execute.prepare.input_links``)."""
        found: list[str] = []
        for pattern, producers in matches:
            norm = posixpath.normpath(pattern)
            if not producers:
                for path in sorted(glob.glob(os.path.join(self.spec_dir, norm))):
                    if os.path.isfile(path):
                        rel = os.path.relpath(path, self.spec_dir)
                        new = path not in self._ids
                        found.append(self.describe(path, "inputs/" + _inside(rel), _posix(rel)))
                        if new:
                            self.external.append(found[-1])
                continue
            for producer, _ in producers:
                root, place = self.layout.published(producer), self.layout.place(producer).replace(os.sep, "/")
                found.extend(self.describe(os.path.join(root, rel), f"outputs/{place}/{_posix(rel)}",
                                           f"{producer}: {_posix(rel)}")
                             for rel in self.published(producer)
                             if rel == norm or fnmatch.fnmatchcase(_posix(rel), norm))
        return list(dict.fromkeys(found))


def _posix(rel: str) -> str:
    return rel.replace(os.sep, "/")


def _inside(rel: str) -> str:
    """A path relative to the spec's directory as a place in the crate: ``..`` parts become ``_up``."""
    return "/".join("_up" if part == ".." else part for part in _posix(rel).split("/"))
