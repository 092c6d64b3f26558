"""The listing of an image folder, kept in an index file: building a dataset opens no image file.

Listing a folder reads directories only (`os.scandir`); no image file is opened (undecodable files are found and
replaced when a sample is read, engine/data/datasets.py). The listing is written, gzip text, to
`.beit-index/listing.gz` in the folder (or, when the folder is read-only, to ~/.cache/beit-engine/index/), with the
modification time of every directory it read; the hidden folder is made before the listing, so writing the index
does not change the time of the folder it lists. A later build, in this run or another, on this rank or another,
reuses the index when every one of those directories still has its time (a file added, removed or renamed changes
its directory's time): one `stat` per directory, no listing. A changed folder is listed again.

In a multi-rank launch the first process of each node lists and writes; the node's other ranks wait for that index
(up to INDEX_WAIT_S, then list themselves), so a network filesystem sees one listing per node, not one per rank.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

INDEX_DIR, INDEX_NAME = ".beit-index", "listing.gz"
INDEX_VERSION = 1
INDEX_WAIT_S = 600.0
CACHE_DIR = Path("~/.cache/beit-engine/index")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderListing:
    """What a folder holds: class names (empty for a flat folder), (relative path, label) per image in sorted order,
    files without an image extension, and the modification time (ns) of every directory read."""

    layout: str  # "classes" | "flat"
    classes: list[str]
    samples: list[tuple[str, int]]
    ignored: list[str] = field(default_factory=list)
    dir_times: dict[str, int] = field(default_factory=dict)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _files(root: Path, folder: str, recursive: bool, listing: FolderListing) -> list[str]:
    """Sorted relative paths of the image files under `root/folder` (recursively: the whole subtree, hidden folders
    skipped), recording non-image files and each directory's time."""
    paths, pending = [], [folder]
    while pending:
        directory = pending.pop()
        listing.dir_times[directory] = os.stat(root / directory).st_mtime_ns
        with os.scandir(root / directory) as entries:
            for entry in entries:
                if _is_hidden(entry.name):
                    continue
                relative = os.path.join(directory, entry.name) if directory != "." else entry.name
                if entry.is_dir():  # follows links, as os.walk(followlinks=True)
                    if recursive:
                        pending.append(relative)
                elif not _has_image_extension(entry.name):
                    listing.ignored.append(relative)
                else:
                    paths.append(relative)
    return sorted(paths)


def list_folder(root: Path, layout: str) -> FolderListing:
    """Lists `root` ("classes": one recursive listing per non-hidden subfolder; "flat": the files in root)."""
    with os.scandir(root) as entries:
        subfolders = sorted(e.name for e in entries if e.is_dir() and not _is_hidden(e.name))
    if layout == "auto":
        layout = "classes" if subfolders else "flat"
    if layout == "flat":
        listing = FolderListing("flat", [], [])
        listing.samples = [(path, -1) for path in _files(root, ".", False, listing)]
    else:
        listing = FolderListing("classes", subfolders, [])
        listing.dir_times["."] = os.stat(root).st_mtime_ns
        with os.scandir(root) as entries:
            listing.ignored += sorted(e.name for e in entries if e.is_file() and not _is_hidden(e.name))
        for label, name in enumerate(subfolders):
            listing.samples += [(path, label) for path in _files(root, name, True, listing)]
    listing.ignored.sort()
    return listing


def index_path(root: Path) -> Path:
    """`root/.beit-index/listing.gz` when root is writable, else a file under CACHE_DIR named after root's real
    path."""
    if os.access(root, os.W_OK):
        return root / INDEX_DIR / INDEX_NAME
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return CACHE_DIR.expanduser() / f"{digest}.gz"


def _write(path: Path, root: Path, listing: FolderListing) -> None:
    """Atomically: header JSON line, then one `label<TAB>relative path` line per sample."""
    header = {"version": INDEX_VERSION, "root": str(root.resolve()), "layout": listing.layout,
              "classes": listing.classes, "ignored": listing.ignored, "dir_times": listing.dir_times}
    handle, scratch = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as out:
            out.write((json.dumps(header) + "\n").encode())
            out.write("".join(f"{label}\t{name}\n" for name, label in listing.samples).encode())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _read_fresh(path: Path, root: Path, layout: str) -> FolderListing | None:
    """The index at `path` when it is this folder's, of the asked layout, and no directory it read has changed."""
    try:
        with gzip.open(path, "rt") as lines:
            header = json.loads(next(lines))
            if (header.get("version") != INDEX_VERSION or header.get("root") != str(root.resolve())
                    or layout not in ("auto", header["layout"])):
                return None
            for directory, mtime in header["dir_times"].items():
                if os.stat(root / directory).st_mtime_ns != mtime:
                    return None
            samples = [(name, int(label)) for label, name in (line.rstrip("\n").split("\t", 1) for line in lines)]
    except (OSError, ValueError, KeyError, StopIteration, EOFError):
        return None  # absent, unreadable, half-written by an older version, or a folder that moved: list again
    return FolderListing(header["layout"], header["classes"], samples, header["ignored"], header["dir_times"])


def folder_listing(root: Path, layout: str = "auto", local_rank: int = 0) -> FolderListing:
    """`root`'s listing from a fresh index, else listed (and the index written). A process that is not the first
    of its node (`local_rank` > 0) first waits up to INDEX_WAIT_S for that process's index."""
    path = index_path(root)
    listing = _read_fresh(path, root, layout)
    deadline = time.monotonic() + INDEX_WAIT_S
    while listing is None and local_rank > 0 and time.monotonic() < deadline:
        time.sleep(1.0)
        listing = _read_fresh(path, root, layout)
    if listing is not None:
        return listing
    start = time.monotonic()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # before the listing: it changes root's time
        writable = True
    except OSError:
        writable = False
    listing = list_folder(root, layout)
    try:
        if not writable:
            raise PermissionError(f"cannot create {path.parent}")
        _write(path, root, listing)
    except OSError as err:  # an unwritable cache: the run goes on, the next one lists again
        logger.warning("%s: could not write the folder index %s (%s); the next run lists the folder again", root,
                       path, err)
    logger.info("%s: listed %d images in %.1f s (index %s)", root, len(listing.samples), time.monotonic() - start,
                path)
    return listing
