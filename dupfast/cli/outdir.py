"""`--out` folders of the command line: a new run's files never mix with an earlier run's, and nothing
else in the folder is touched.

    out = prepare_out(args.out, args.overwrite, OUTPUTS)   # before any compute: refuse a file, or a folder
    ...                                                    # that already holds entries (unless --overwrite)
    clear_outputs(out, OUTPUTS)                            # right before writing: drop the earlier run's files

OUTPUTS are the names (globs allowed) a command writes; with --overwrite only those are removed, so an
earlier run's extra files (a PNG of a run that had ground truth) cannot sit beside the new results, and
the user's own files stay. Removal waits until the new results exist in memory: a run that fails keeps
the earlier results.
"""
import pathlib
import shutil
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
    for parent in out.parents:  # a file where a parent folder should be would fail only at the end
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {out}: {parent} is a file, not a folder")
            break
    return out


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
