import os
import re

import pytest

from aligner.data.atomic_io import replace_dir_atomic, write_text_atomic
from aligner.data.errors import DataFileNotFoundError, DataFormatError
from aligner.data.jsonl import iter_jsonl, require_fields, write_jsonl


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_iter_jsonl_numbers_lines_from_one_and_skips_blank_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"a": 1}\n\n   \n{"a": 2}\n\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2})]


def test_iter_jsonl_tolerates_bom_and_crlf(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes('\ufeff{"a": "é"}\r\n{"a": 2}\r\n'.encode("utf-8"))
    assert list(iter_jsonl(path)) == [(1, {"a": "é"}), (2, {"a": 2})]


def test_malformed_json_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.jsonl", '{"a": 1}\n{"a": 2,}\n')
    with pytest.raises(DataFormatError) as info:
        list(iter_jsonl(path))
    assert str(info.value).startswith(f"{path}:2: invalid JSON")
    assert info.value.line == 2 and info.value.path == str(path)


def test_non_object_line_is_rejected(tmp_path):
    path = write(tmp_path / "list.jsonl", '{"a": 1}\n{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:3: expected a JSON object per line, got list"):
        list(iter_jsonl(path))


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=rf"^{re.escape(str(path))}:2: not valid UTF-8"):
        list(iter_jsonl(path))


def test_missing_file_is_a_file_not_found_error_and_suggests_close_name(tmp_path):
    write(tmp_path / "train.jsonl", "{}\n")
    missing = tmp_path / "trian.jsonl"
    with pytest.raises(DataFileNotFoundError) as info:
        list(iter_jsonl(missing))
    err = info.value
    assert isinstance(err, FileNotFoundError) and isinstance(err, DataFormatError)
    assert str(err).startswith(f"{missing}: file not found")
    assert "did you mean" in str(err) and str(tmp_path / "train.jsonl") in str(err)
    # No suggestion when nothing is close.
    with pytest.raises(DataFileNotFoundError) as info:
        list(iter_jsonl(tmp_path / "zzzzzz.jsonl"))
    assert "did you mean" not in str(info.value)


def test_require_fields_reports_missing_keys_and_wrong_types(tmp_path):
    require_fields({"a": "x", "b": "y"}, ["a", "b"], "f.jsonl", 3, str)
    with pytest.raises(DataFormatError, match=r"^f\.jsonl:7: missing field\(s\) 'b'; the record has \['a'\]"):
        require_fields({"a": 1}, ["a", "b"], "f.jsonl", 7)
    with pytest.raises(DataFormatError, match=r"^f\.jsonl:2: field 'a' must be str, got int"):
        require_fields({"a": 1}, ["a"], "f.jsonl", 2, str)
    # true/false must not pass as a number
    with pytest.raises(DataFormatError, match="must be int or float, got bool"):
        require_fields({"r": True}, ["r"], "f.jsonl", 1, (int, float))


def test_write_jsonl_round_trips_unicode_and_leaves_no_temp_files(tmp_path):
    records = [{"prompt": "é ü", "n": 1}, {"prompt": "line\nbreak", "n": 2.5}]
    path = tmp_path / "sub" / "out.jsonl"
    assert write_jsonl(path, records) == 2
    assert [r for _, r in iter_jsonl(path)] == records
    raw = path.read_text(encoding="utf-8")
    assert "é ü" in raw and raw.count("\n") == 2  # UTF-8, not \u escapes; embedded newline escaped
    assert os.listdir(path.parent) == ["out.jsonl"]


def test_write_jsonl_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"v": 1}])

    def broken():
        yield {"v": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(path, broken())
    assert [r for _, r in iter_jsonl(path)] == [{"v": 1}]
    assert os.listdir(tmp_path) == ["out.jsonl"]
    with pytest.raises(ValueError):  # NaN is not JSON
        write_jsonl(path, [{"v": float("nan")}])
    assert [r for _, r in iter_jsonl(path)] == [{"v": 1}]


def test_replace_dir_atomic_replaces_whole_directory_only_on_success(tmp_path):
    target = tmp_path / "tok"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with replace_dir_atomic(target) as tmp:
            write_text_atomic(os.path.join(tmp, "new.txt"), "new")
            raise RuntimeError("boom")
    assert sorted(os.listdir(target)) == ["old.txt"]
    with replace_dir_atomic(target) as tmp:
        write_text_atomic(os.path.join(tmp, "new.txt"), "new")
    assert sorted(os.listdir(target)) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["tok"]
    assert (target / "new.txt").read_text() == "new"
