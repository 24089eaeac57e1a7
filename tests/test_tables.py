"""dupfast.tables: columns by name (never by position), the paper's file formats, errors naming file and line."""
import json

import pytest

from dupfast.harness import data
from dupfast.tables import read_table


def write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_sst2_tsv(tmp_path):
    t = read_table(write(tmp_path / "x.tsv", 'sentence\tlabel\nit \'s "great"\t1\nNA\t0\n'), need_labels=True)
    assert t.texts == ['it \'s "great"', "NA"] and t.labels == [1, 0] and t.poison_labels is None
    assert (t.text_column, t.label_column) == ("sentence", "label")
    assert t.samples() == [data.Sample('it \'s "great"', 1, 0), data.Sample("NA", 0, 0)]


def test_openbackdoor_dump(tmp_path):
    t = read_table(write(tmp_path / "p.csv", ',0,1,2\n0,"a, b",1,1\n1,NA,0,0\n'))
    assert t.texts == ["a, b", "NA"] and t.labels == [1, 0] and t.poison_labels == [1, 0]
    assert t.samples() == [data.Sample("a, b", 1, 1), data.Sample("NA", 0, 0)]


def test_text_column_by_name_not_position(tmp_path):
    t = read_table(write(tmp_path / "r.csv", "id,review\n7,a fine film\n8,dull\n"))
    assert t.texts == ["a fine film", "dull"] and t.labels is None
    # label first, text second: the same columns whichever command reads it
    t = read_table(write(tmp_path / "l.tsv", "label\ttext\n1\tgood\n0\tbad\n"), need_labels=True)
    assert t.texts == ["good", "bad"] and t.labels == [1, 0]
    t = read_table(write(tmp_path / "c.csv", "Label,Sentence,poison_label\n1,good,0\n"))
    assert (t.texts, t.labels, t.poison_labels) == (["good"], [1], [0])  # case-insensitive names


def test_explicit_columns(tmp_path):
    path = write(tmp_path / "e.csv", "id,comment_body,stars\n1,great,1\n2,awful,0\n")
    with pytest.raises(ValueError, match=r"e.csv: no text column among \['id', 'comment_body', 'stars'\]; "
                                         "name one with --text-column"):
        read_table(path)
    t = read_table(path, text_column="comment_body", label_column="stars", need_labels=True)
    assert t.texts == ["great", "awful"] and t.labels == [1, 0]
    with pytest.raises(ValueError, match=r"no column 'body' \(--text-column\); columns are"):
        read_table(path, text_column="body")
    with pytest.raises(ValueError, match="cannot be both the text and the label"):
        read_table(path, text_column="stars", label_column="stars")


def test_jsonl_and_txt(tmp_path):
    rows = [{"text": "good", "label": 1, "idx": 0}, {"text": "bad", "label": 0.0, "idx": 1}]
    t = read_table(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n"), need_labels=True)
    assert t.texts == ["good", "bad"] and t.labels == [1, 0]
    t = read_table(write(tmp_path / "p.txt", "first text\n\nsecond, with a comma\n"))
    assert t.texts == ["first text", "second, with a comma"] and t.labels is None


def test_a_byte_order_mark_is_not_part_of_a_name(tmp_path):
    t = read_table(write(tmp_path / "b.csv", "\ufefftext,label\nok,1\n"), need_labels=True)
    assert t.texts == ["ok"] and t.text_column == "text"


# ---- errors name the file and the line -----------------------------------------------------------

def test_not_utf8(tmp_path):
    path = write(tmp_path / "latin.tsv", "sentence\tlabel\nfine\t1\ncaf\u00e9\t0\n", encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin.tsv line 3: not UTF-8 text \(byte 0xe9\)"):
        read_table(path)


def test_empty_header_only_and_unknown(tmp_path):
    with pytest.raises(ValueError, match="empty.csv is empty"):
        read_table(write(tmp_path / "empty.csv", "\n \n"))
    with pytest.raises(ValueError, match="head.tsv has no data rows"):
        read_table(write(tmp_path / "head.tsv", "sentence\tlabel\n"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"unknown format '.json'"):
        read_table(write(tmp_path / "x.json", "[]"))


def test_labels_needed(tmp_path):
    with pytest.raises(ValueError, match=r"the clean set needs a label column \(label, labels, class"):
        read_table(write(tmp_path / "n.tsv", "sentence\nfine\n"), need_labels=True, role="the clean set")
    with pytest.raises(ValueError, match="a .txt file holds texts only, but the clean set needs labels"):
        read_table(write(tmp_path / "n.txt", "fine\n"), need_labels=True, role="the clean set")
    with pytest.raises(ValueError, match="no label column, so no labelled samples"):
        read_table(write(tmp_path / "m.tsv", "sentence\nfine\n")).samples()


def test_bad_rows_name_their_line(tmp_path):
    with pytest.raises(ValueError, match=r"r.tsv line 3: 3 fields, the header has 2 \(a tab inside a text\?\)"):
        read_table(write(tmp_path / "r.tsv", "sentence\tlabel\nok\t1\nbad\ttext\t0\n"))
    with pytest.raises(ValueError, match=r"l.csv line 4: the label in column 'label' must be an integer, got "
                                         r"'positive'"):
        read_table(write(tmp_path / "l.csv", "text,label\na,1\n\nb,positive\n"), need_labels=True)
    with pytest.raises(ValueError, match=r"p.csv line 2: the poison label in column '2' must be an integer"):
        read_table(write(tmp_path / "p.csv", ",0,1,2\n0,a,1,yes\n"))
    with pytest.raises(ValueError, match=r"j.jsonl line 2: no 'label' key"):
        read_table(write(tmp_path / "j.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n'), need_labels=True)
    with pytest.raises(ValueError, match=r"k.jsonl line 1: each line must be a JSON object, got list"):
        read_table(write(tmp_path / "k.jsonl", '["a", 1]\n'))
    with pytest.raises(ValueError, match=r"m.jsonl line 2: not a JSON object"):
        read_table(write(tmp_path / "m.jsonl", '{"text": "a"}\n{"text": \n'))
    with pytest.raises(ValueError, match=r"t.jsonl line 1: the text in column 'text' must be a string, got 3"):
        read_table(write(tmp_path / "t.jsonl", '{"text": 3}\n'))


# ---- the paper data, read as dupfast.harness.data reads it ------------------------------------------------

@pytest.mark.shared_data
def test_shared_paper_files_read_as_dupfast_data_reads_them(shared_data):
    files = [shared_data / "sst-2" / f"{s}.tsv" for s in ("train", "dev", "test")]
    files += sorted((shared_data / "sst-2" / "poison").glob("*/*.csv")) + sorted((shared_data / "agnews").glob("*.csv"))
    for path in files:
        expected = data.read_tsv(path) if path.suffix == ".tsv" else data.read_poison_csv(path)
        assert read_table(path, need_labels=True).samples() == expected, path
