"""Tests for zfsbackd.validation: the rules shared by the CLI, the control socket and the config."""

from __future__ import annotations

import pytest

from zfsbackd.errors import BadRequest
from zfsbackd.validation import (
    BACKUP_ID_RE,
    describe_value,
    parse_tags,
    tag_problems,
    validate_backup_id,
    validate_backup_name,
    validate_file_system_id,
    validate_tags,
)


@pytest.mark.parametrize(
    "value", ["backup-0123456789abcdef0", "backup-00000000000000000", "backup-fffffffffffffffff"]
)
def test_backup_id_accepts_17_lowercase_hex(value: str) -> None:
    assert validate_backup_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "backup-0123456789abcdef",  # 16 digits
        "backup-0123456789abcdef01",  # 18 digits
        "backup-0123456789ABCDEF0",  # uppercase
        "backup-0123456789abcdefg",  # not hex
        "Backup-0123456789abcdef0",
        "backup-0123456789abcdef0\n",  # a trailing new line must not sneak through `$`
        " backup-0123456789abcdef0",
        "fs-0123456789abcdef0",
    ],
)
def test_backup_id_rejects(value: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_backup_id(value)
    assert info.value.message.startswith("--backup-id: ")
    assert "17 lowercase hex digits" in info.value.message


def test_backup_id_regex_rejects_trailing_newline_with_match() -> None:
    assert BACKUP_ID_RE.match("backup-0123456789abcdef0")
    assert not BACKUP_ID_RE.match("backup-0123456789abcdef0\n")


def test_backup_id_suggests_lowercase_and_names_where() -> None:
    with pytest.raises(BadRequest) as info:
        validate_backup_id("BACKUP-0123456789ABCDEF0", where="--source-backup-id")
    assert info.value.message.startswith("--source-backup-id: ")
    assert "did you mean backup-0123456789abcdef0?" in info.value.message


def test_backup_id_rejects_non_text() -> None:
    with pytest.raises(BadRequest, match="got the number 5"):
        validate_backup_id(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    ["a", "nightly", "Before upgrade 2024-05-01 10:00", "Sauvegarde été", "バックアップ", "a.b+c-d=e_f:g/h",
     "x" * 256, "٣", "ops@example.com"],
)
def test_backup_name_accepts(value: str) -> None:
    assert validate_backup_name(value) == value


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "empty"),
        ("x" * 257, "257 characters long, at most 256"),
        ("tab\there", "'\\t' (U+0009)"),
        ("new\nline", "U+000A"),
        ("semi;colon", "';' (U+003B)"),
        ("hash#sign", "'#' (U+0023)"),
        ("quote'", "U+0027"),
        ("emoji 😀", "U+1F600"),
    ],
)
def test_backup_name_rejects(value: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_backup_name(value)
    assert info.value.message.startswith("--name: ")
    assert fragment in info.value.message


def test_backup_name_lists_each_bad_character_once() -> None:
    with pytest.raises(BadRequest) as info:
        validate_backup_name("a;b;c!", where="Name")
    assert info.value.message.count("U+003B") == 1
    assert "U+0021" in info.value.message
    assert info.value.message.startswith("Name: ")


def test_validate_tags_accepts_edges() -> None:
    tags = {"k" * 128: "v" * 256, "empty value": "", "Team": "storage", "path:/x=y+z_.": "ä ö"}
    tags.update({f"key{i}": str(i) for i in range(46)})
    assert len(tags) == 50
    assert validate_tags(tags) == tags


@pytest.mark.parametrize(
    ("tags", "fragment"),
    [
        ({"": "x"}, "a tag key is empty"),
        ({"k" * 129: "x"}, "129 characters long, at most 128"),
        ({"k": "v" * 257}, "257 characters long, at most 256"),
        ({"aws:created-by": "x"}, "reserved"),
        ({"AWS:created-by": "x"}, "reserved"),
        ({"bad|key": "x"}, "'|' (U+007C)"),
        ({"k": "bad\tvalue"}, "U+0009"),
        ({"k": 5}, "the number 5, not text"),
        ({"k": True}, "the boolean true, not text"),
        ({7: "x"}, "tag key the number 7 is not text"),
        ({f"k{i}": "v" for i in range(51)}, "51 tags, at most 50"),
    ],
)
def test_validate_tags_rejects(tags: dict[object, object], fragment: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_tags(tags, where="file_systems[0].tags")  # type: ignore[arg-type]
    assert info.value.message.startswith("file_systems[0].tags: ")
    assert fragment in info.value.message


def test_tag_problems_reports_every_problem() -> None:
    problems = tag_problems({"aws:x": "ok", "good": "bad;value", "": ""}, "tags")
    assert len(problems) == 3
    assert all(problem.startswith("tags: ") for problem in problems)


def test_parse_tags_splits_on_first_equals() -> None:
    assert parse_tags(["team=storage", "expr=a=b", "empty="]) == {
        "team": "storage", "expr": "a=b", "empty": ""}
    assert parse_tags([]) == {}


def test_parse_tags_rejects_missing_equals_and_duplicates() -> None:
    with pytest.raises(BadRequest) as info:
        parse_tags(["team", "a=1", "a=2", "aws:x=1"])
    message = info.value.message
    assert "--tag: 'team' is not KEY=VALUE" in message
    assert "'a' is given more than once" in message
    assert "reserved" in message
    assert message.count("\n") == 2  # three problems, all reported


def test_parse_tags_uses_where() -> None:
    with pytest.raises(BadRequest, match=r"^Tags: 'x' is not KEY=VALUE"):
        parse_tags(["x"], where="Tags")


@pytest.mark.parametrize("value", ["fs-a", "fs-0", "fs-home", "fs-a-b-c", "fs-" + "a" * 63, "fs-a-"])
def test_file_system_id_accepts(value: str) -> None:
    assert validate_file_system_id(value) == value


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("fs-", ""),
        ("fs--a", ""),
        ("fs-" + "a" * 64, ""),
        ("fs-Home", "did you mean fs-home?"),
        ("home", "did you mean fs-home?"),
        ("fs_home", ""),
        ("fs-home\n", "did you mean fs-home?"),
        ("fs-ho me", ""),
    ],
)
def test_file_system_id_rejects(value: str, hint: str) -> None:
    with pytest.raises(BadRequest) as info:
        validate_file_system_id(value)
    assert info.value.message.startswith("--file-system-id: ")
    assert "fs- followed by 1 to 63 lowercase letters" in info.value.message
    assert hint in info.value.message


def test_describe_value_names_yaml_types() -> None:
    assert describe_value(True) == "the boolean true"
    assert describe_value(150) == "the number 150"
    assert describe_value("yes") == "the text 'yes'"
    assert describe_value(None) == "nothing (null)"
    assert describe_value([1]) == "a list"
    assert describe_value({}) == "a mapping"


def test_long_values_are_shortened_in_messages() -> None:
    with pytest.raises(BadRequest) as info:
        validate_backup_id("x" * 10_000)
    assert len(info.value.message) < 400
