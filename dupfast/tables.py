"""Text tables for the command line (`dupfast detect | purify | btu`): CSV, TSV, JSON lines, plain text.

    table = read_table("pool.csv")                          # .texts, .labels or None, .poison_labels or None
    read_table("clean.tsv", need_labels=True, role="the clean set").samples()

Columns are found by name in the header (a CSV/TSV's first line, a JSON-lines file's first object), never
by position:
    text          the option (--text-column), else the first of TEXT_COLUMNS present (case-insensitive):
                  text, sentence, review, content, document, comment, tweet, body; else "0" in an
                  OpenBackdoor/DUP dump (header `,0,1,2`: index, text, label, poison_label)
    label         --label-column, else label, labels, class; "1" in a dump
    poison label  poison_label; "2" in a dump (evaluation only: detection reports AUROC/FAR from it)
So `id,review` reads `review`, and a file with no text column by these names is an error that lists its
columns (pass --text-column) rather than a silent read of its first column.

`.txt`: one text a line, no header, no labels. `.tsv` is read without quote processing (SST-2 texts hold
bare quotes); `.csv` with standard quoting. Errors name the file and the line: not UTF-8, empty, header
only, missing columns, a row with the wrong number of fields, a label that is not an integer.
"""
import csv
import dataclasses
import io
import json
import pathlib
from typing import List, Optional

TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "comment", "tweet", "body")
LABEL_COLUMNS = ("label", "labels", "class")
POISON_COLUMNS = ("poison_label",)
FORMATS = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".jsonl": "json", ".ndjson": "json", ".txt": "lines"}


@dataclasses.dataclass
class Table:
    path: pathlib.Path
    texts: List[str]
    labels: Optional[List[int]] = None
    poison_labels: Optional[List[int]] = None
    text_column: Optional[str] = None
    label_column: Optional[str] = None
    header: Optional[List[str]] = None       # every column of the file, with keep_records=True
    records: Optional[List[dict]] = None     # every row as {column: value as written}, with keep_records=True

    def __len__(self):
        return len(self.texts)

    def samples(self):
        """`dupfast.samples.Sample`s (text, label, poison_label); needs labels."""
        from .samples import Sample
        if self.labels is None:
            raise ValueError(f"{self.path}: no label column, so no labelled samples")
        poison = self.poison_labels or [0] * len(self.texts)
        return [Sample(t, y, p) for t, y, p in zip(self.texts, self.labels, poison)]


def _decode(path: pathlib.Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as "
                         "UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first column's name
    if not text.strip():
        raise ValueError(f"{path} is empty (a header row and at least one text are needed)")
    return text


def _records(path: pathlib.Path, text: str, kind: str):
    """(header, [(line number, {column: value})]) of a CSV/TSV/JSON-lines file."""
    if kind == "json":
        header, out = None, []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {n}: not a JSON object ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path} line {n}: each line must be a JSON object, got {type(obj).__name__}")
            if header is None:
                header = [str(k) for k in obj]
            out.append((n, {str(k): v for k, v in obj.items()}))
        return header, out
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=kind,
                        quoting=csv.QUOTE_NONE if kind == "\t" else csv.QUOTE_MINIMAL)
    header, out = None, []
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line
            if header is None:
                header = row
                continue
            if len(row) != len(header):
                raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
                                 + (" (a tab inside a text?)" if kind == "\t" else ""))
            out.append((reader.line_num, dict(zip(header, row))))
    except csv.Error as exc:
        raise ValueError(f"{path} line {reader.line_num}: {exc}") from None
    return header, out


def _find(header, explicit, candidates, path, option):
    if explicit is not None:
        if explicit not in header:
            raise ValueError(f"{path}: no column {explicit!r} ({option}); columns are {header}")
        return explicit
    lower = {h.strip().lower(): h for h in reversed(header)}  # the first of equal names wins
    return next((lower[c] for c in candidates if c in lower), None)


def _label(value, path, line, column, what="label"):
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{path} line {line}: the {what} in column {column!r} must be an integer, got {value!r}")
    return number


def read_table(path, text_column: Optional[str] = None, label_column: Optional[str] = None,
               need_labels: bool = False, role: str = "this file", raw_labels: bool = False,
               keep_records: bool = False) -> Table:
    """Read a table (module docstring). need_labels: a missing label column is an error naming `role`.
    raw_labels: labels as written (strings allowed, mapped by the caller: `dupfast screen --label-map`);
    keep_records: also every column of every row (`Table.header`, `Table.records`), for outputs that keep them."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; use .csv, .tsv, .jsonl (or .txt, one text a "
                         "line)")
    text = _decode(path)
    if kind == "lines":
        if need_labels:
            raise ValueError(f"{path}: a .txt file holds texts only, but {role} needs labels (.tsv, .csv or "
                             ".jsonl with a label column)")
        lines = [line for line in text.splitlines() if line.strip()]
        return Table(path, lines, **({"header": ["text"], "records": [{"text": t} for t in lines]}
                                     if keep_records else {}))

    header, records = _records(path, text, kind)
    if not records:
        raise ValueError(f"{path} has no data rows (line 1 is the header; a header row and at least one text "
                         "are needed)")
    dump = {"0", "1"} <= set(header)  # the pandas dump's integer column names
    t_col = _find(header, text_column, TEXT_COLUMNS + (("0",) if dump else ()), path, "--text-column")
    if t_col is None:
        raise ValueError(f"{path}: no text column among {header}; name one with --text-column (known names: "
                         f"{', '.join(TEXT_COLUMNS)}, or an OpenBackdoor dump's '0')")
    l_col = _find(header, label_column, LABEL_COLUMNS + (("1",) if dump else ()), path, "--label-column")
    p_col = _find(header, None, POISON_COLUMNS + (("2",) if dump else ()), path, "")
    if l_col == t_col:
        raise ValueError(f"{path}: column {t_col!r} cannot be both the text and the label")
    if need_labels and l_col is None:
        raise ValueError(f"{path}: {role} needs a label column ({', '.join(LABEL_COLUMNS)}, or --label-column); "
                         f"columns are {header}")

    texts, labels, poison = [], [] if l_col else None, [] if p_col not in (None, t_col, l_col) else None
    for line, rec in records:
        missing = [c for c in (t_col, l_col, p_col) if c is not None and c not in rec]
        if missing:
            raise ValueError(f"{path} line {line}: no {missing[0]!r} key (JSON lines need the same keys on every "
                             "line)")
        value = rec[t_col]
        if not isinstance(value, str):
            raise ValueError(f"{path} line {line}: the text in column {t_col!r} must be a string, got {value!r}")
        texts.append(value)
        if labels is not None:
            labels.append(rec[l_col] if raw_labels else _label(rec[l_col], path, line, l_col))
        if poison is not None:
            poison.append(_label(rec[p_col], path, line, p_col, "poison label"))
    kept = {"header": header, "records": [rec for _, rec in records]} if keep_records else {}
    return Table(path, texts, labels, poison, t_col, l_col, **kept)
