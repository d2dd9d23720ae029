"""Reading index files whose inverted lists may live on disk (`x.faissindex` + `x.ivfdata`).

The one reader every search command goes through (`search.index.read_index`): faiss's
reader with the lists memory-mapped read-only, found beside the index wherever the pair
was moved, and checked (present, not truncated) before any list is touched. Building and
merging such indexes is `search.ondisk`.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss


def faiss_message(e: Exception) -> str:
    """The last line of a faiss C++ error (the line that says what is wrong)."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


class IndexBuildError(ValueError):
    """Codes, shards or on-disk files that cannot make (or be) the index asked for."""


def ivfdata_path(index_path: str | os.PathLike) -> Path:
    """Where the inverted lists of an on-disk index live: `x.faissindex` -> `x.ivfdata`."""
    return Path(index_path).with_suffix(".ivfdata")


def ondisk_lists(index):
    """The index's OnDiskInvertedLists, or None when its lists are in memory."""
    try:
        ivf_part = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index: no lists at all (the caller says what it expected)
        return None
    lists = faiss.downcast_InvertedLists(ivf_part.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def check_ivfdata(index, index_path: str | os.PathLike) -> None:
    """An on-disk index's `.ivfdata` holds all its lists: a file cut short would crash
    the first search that reads past its end (the lists are memory-mapped)."""
    lists = ondisk_lists(index)
    if lists is None:
        return
    data = lists.filename
    size = os.path.getsize(data) if os.path.isfile(data) else None
    if size is None:
        raise FileNotFoundError(f"on-disk index {index_path}: its inverted lists {data} are missing")
    if size < lists.totsize:
        raise IndexBuildError(f"on-disk index {index_path}: its inverted lists {data} are truncated "
                              f"({size} bytes, {lists.totsize} written)")


def read_ondisk_index(path: str | os.PathLike, what: str = "index"):
    """faiss.read_index for indexes whose lists may be on disk: the `.ivfdata` is looked
    for beside the index (wherever the pair was moved), memory-mapped read-only, and
    checked (present, not truncated) before any list is touched."""
    path = os.fspath(path)
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    try:
        index = faiss.read_index(path, flags)
    except RuntimeError as e:
        message, data = faiss_message(e), ivfdata_path(path)
        if "OnDiskInvertedLists" in str(e) or "could not open" in str(e).lower():
            if data.is_file():
                raise IndexBuildError(f"on-disk {what} {path}: its inverted lists {data} cannot be mapped "
                                      f"(truncated or damaged?): {message}") from None
            raise FileNotFoundError(f"on-disk {what} {path}: its inverted lists {data} are missing "
                                    f"({message})") from None
        raise ValueError(f"{what} {path} is not a faiss index: {message}") from None
    check_ivfdata(index, path)
    return index
