"""The data sources' names and the cheap check that a source can load here, without torch or numpy.

``workloads.data`` loads the sources (and re-exports these names); a spec's validation
(``orchestrator.spec``, ``orchestrator.preflight``) needs only what is here, so that a refused spec
costs no torch import (issue #32: a refusal in well under 2 s).
"""

from __future__ import annotations

from pathlib import Path

TEXT_SOURCES = ("stdlib", "text", "bin")
IMAGE_SOURCES = ("digits", "imagefolder", "cifar10", "synthetic")


def need_path(source: str, data_path: str | None) -> str:
    """``data_path``, or a one-line ``ValueError`` when a source that reads files has none."""
    if not data_path:
        raise ValueError(f"data: source {source!r} needs data_path (a file or folder on this machine)")
    return data_path


def check_source(source: str, data_path: str | None = None, vocab_size: int | None = None) -> None:
    """Raise (``ValueError`` / ``FileNotFoundError``, one line naming the path) when ``source`` cannot
    load on this machine. Cheap: looks at files, reads no data set; what it cannot see (a corpus
    too short for ``seq_len``, a corrupt file) still fails inside the trial."""
    if source in ("stdlib", "digits", "synthetic", "auto"):
        return
    path = Path(need_path(source, data_path)).expanduser()
    if source == "text":
        if path.is_file():
            size = path.stat().st_size
        elif path.is_dir():
            size = 0
            for f in path.rglob("*"):
                if f.is_file():
                    size += f.stat().st_size
                    if size >= 1000:
                        break
        else:
            raise FileNotFoundError(f"data_path {str(path)!r}: no such file or folder (data: text)")
        if size < 1000:
            raise ValueError(f"data_path {str(path)!r}: only {size} bytes of text; need at least 1000 (data: text)")
    elif source == "bin":
        missing = [n for n in ("train.bin", "val.bin") if not (path / n).is_file()]
        if missing:
            raise FileNotFoundError(f"data_path {str(path)!r}: expected nanoGPT shards train.bin and val.bin; "
                                    f"missing {', '.join(missing)} (data: bin)")
    elif source == "imagefolder":
        if not path.is_dir() or not any(d.is_dir() for d in path.iterdir()):
            raise FileNotFoundError(f"data_path {str(path)!r}: not a folder of class sub-folders (data: imagefolder)")
    elif source == "cifar10":
        folder = path / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"data_path {str(path)!r}: no CIFAR-10 there (expected {folder}/ with "
                                    f"{', '.join(names)}; missing {', '.join(missing[:3])}"
                                    f"{'...' if len(missing) > 3 else ''}); nothing is downloaded (data: cifar10)")
    else:
        raise ValueError(f"data: unknown source {source!r}; allowed: {list(TEXT_SOURCES + IMAGE_SOURCES)}")
