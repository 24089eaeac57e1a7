"""`--out` folders of the command line: a new run's files never mix with an earlier run's, and nothing
else in the folder is touched.

    out = prepare_out(args.out, args.overwrite, OUTPUTS)   # before any compute: refuse a file, or a folder
    ...                                                    # that already holds entries (unless --overwrite)
    clear_outputs(out, OUTPUTS)                            # right before writing: drop the earlier run's files

OUTPUTS are the names (globs allowed) a command writes; with --overwrite only those are removed, so an
earlier run's extra files (a PNG of a run that had ground truth) cannot sit beside the new results, and
the user's own files stay. Removal waits until the new results exist in memory: a run that fails keeps
the earlier results. prepare_out also creates and deletes a probe file where the results will go (the folder, or
its nearest existing parent): a location that cannot be written fails before the work, not after it.
"""
import os
import pathlib
import shutil
import tempfile
from typing import Sequence


def prepare_out(path, overwrite: bool, outputs: Sequence[str]) -> pathlib.Path:
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose a folder for the results")
    if out.is_dir() and not overwrite:
        entries = sorted(p.name for p in out.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise ValueError(f"--out {out} already holds {len(entries)} entries ({shown}): pass --overwrite to "
                             f"replace an earlier run's results ({', '.join(outputs)}; other files are kept), or "
                             "choose a new folder")
    writable_folder(out, f"--out {out}")
    return out


def writable_folder(path, what: str) -> pathlib.Path:
    """The folder `path` is (or will be created in: its nearest existing parent), checked by creating and deleting
    a probe file there; os.access would say yes to root on a read-only mount. `what` starts the error message."""
    path = pathlib.Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), pathlib.Path("."))
    if not folder.is_dir():  # a file where a parent folder should be would fail only at the end
        raise ValueError(f"{what}: {folder} is a file, not a folder: choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".dupfast-write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what}: cannot write in {folder} ({exc.strerror or exc}): choose a folder you can write "
                         "to, or make this one writable (its permissions, a read-only mount)") from None
    return folder


def earlier_outputs(out: pathlib.Path, outputs: Sequence[str]) -> list:
    return sorted({p for pattern in outputs for p in out.glob(pattern)}) if out.is_dir() else []


def clear_outputs(out: pathlib.Path, outputs: Sequence[str]) -> None:
    """Remove what an earlier run of the command left in `out` (only entries matching `outputs`)."""
    for p in earlier_outputs(out, outputs):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
