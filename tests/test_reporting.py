import json

import pytest

from zsq_plugins.reporting import (
    environment_info,
    markdown_table,
    replace_generated_section,
    write_json,
    write_text_atomic,
)


def test_markdown_table_formats_and_orders_columns():
    rows = [{"a": 1.23456, "b": "x"}, {"a": None, "b": 3}]
    table = markdown_table(rows, {"b": "B", "a": "A"}, digits=1)
    assert table.splitlines() == ["| B | A |", "|---|---|", "| x | 1.2 |", "| 3 | – |"]


def test_write_json_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_json(target, {"x": 1})
    assert json.loads(target.read_text()) == {"x": 1}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("zsq_plugins.reporting.os.replace", fail)
    with pytest.raises(OSError):
        write_text_atomic(target, "half")
    assert json.loads(target.read_text()) == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_replace_generated_section(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("intro\n<!-- generated:t -->\nold\n<!-- /generated:t -->\nend\n")
    replace_generated_section(page, "t", "| new |")
    assert page.read_text() == "intro\n<!-- generated:t -->\n| new |\n<!-- /generated:t -->\nend\n"
    with pytest.raises(ValueError, match="generated:other"):
        replace_generated_section(page, "other", "x")


def test_environment_info_records_versions_and_threads():
    env = environment_info()
    assert env["versions"]["torch"].startswith("2.")
    assert env["torch_threads"] >= 1 and env["cpu"]
