"""The AWS CLI's conventions, through the real command: global options anywhere, --output json|table|text,
--query, --filters, client request tokens and tags as FSx takes them, and the man page and completions
generated from the parser (issue 10, item 6)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from enginekit import REPO, CliResult, run_cli, write_config

from zfsbackd.cli import build_parser
from zfsbackd.clidoc import commands
from zfsbackd.errors import EXIT_BAD_REQUEST


def _cli(*args: str | Path) -> CliResult:
    """The command with exactly these arguments (run_cli(config, …) puts --config last; here it goes anywhere)."""
    return run_cli(None, *map(str, args))


@pytest.fixture
def two_backups(xfs_dir: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """A config whose store holds two AVAILABLE backups of fs-src: one unnamed and untagged, one named and tagged."""
    (xfs_dir / "f.txt").write_text("hello")
    config = write_config(tmp_path, {"src": xfs_dir})
    first = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    second = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--name", "nightly", "--tag", "team=ops")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    return config, [first.json["Backup"]["BackupId"], second.json["Backup"]["BackupId"]]


def test_global_options_before_or_after_the_subcommand(two_backups: tuple[Path, list[str]]) -> None:
    config, ids = two_backups
    before = _cli("--config", config, "--output", "table", "describe-backups")
    after = _cli("describe-backups", "--output", "table", "--config", config)
    mixed = _cli("--output", "table", "describe-backups", "--config", config)
    assert before.returncode == 0, before.stderr
    assert before.stdout == after.stdout == mixed.stdout
    assert before.stdout.splitlines()[0].split() == [
        "BackupId", "FileSystemId", "Type", "Lifecycle", "CreationTime", "SizeInBytes", "Name"
    ]
    query_first = _cli("--query", "Backups[].BackupId", "--config", config, "describe-backups")
    assert json.loads(query_first.stdout) == ids
    # Two-level commands take them on every level too.
    valid = _cli("--config", config, "config", "validate", "--output", "text", "--query", "Config.Valid")
    assert valid.stdout == "True\n"
    assert _cli("config", "--config", config, "validate", "--query", "Config.HomeRegion").stdout == '"local"\n'


def test_table_and_text_print_empty_cells_for_absent_values(two_backups: tuple[Path, list[str]]) -> None:
    config, ids = two_backups
    table = run_cli(config, "describe-backups", "--output", "table").stdout
    assert "None" not in table
    unnamed = next(line for line in table.splitlines() if line.startswith(ids[0]))
    assert not unnamed.rstrip().endswith("nightly")
    rows = run_cli(config, "describe-backups", "--output", "text", "--query", "Backups[].[BackupId,Name,Lifecycle]")
    assert rows.stdout.splitlines() == [f"{ids[0]}\t\tAVAILABLE", f"{ids[1]}\tnightly\tAVAILABLE"]
    assert [line.split("\t")[0] for line in rows.stdout.splitlines()] == ids  # `cut -f1` gives the ids


def test_text_output_is_laid_out_like_the_aws_cli(two_backups: tuple[Path, list[str]]) -> None:
    """Objects in a list share one set of columns (sorted keys), nested lists get lines of their own."""
    config, ids = two_backups
    backups = run_cli(config, "describe-backups").json["Backups"]
    lines = run_cli(config, "describe-backups", "--output", "text").stdout.splitlines()
    rows = [line.split("\t") for line in lines if line.startswith("BACKUPS\t")]
    columns = sorted({k for b in backups for k, v in b.items() if not isinstance(v, dict | list)})
    assert len(rows) == 2 and all(len(row) == 1 + len(columns) for row in rows)
    for row, backup in zip(rows, backups, strict=True):
        assert row[1:] == ["" if backup.get(c) is None else str(backup[c]) for c in columns]
    assert "TAGS\tteam\tops" in lines  # the tagged backup's Tags list, one line per tag
    assert any(line.startswith("STATS\t") for line in lines)
    first = run_cli(config, "describe-backups", "--output", "text", "--query", "Backups[0].BackupId")
    assert first.stdout == ids[0] + "\n"
    ids_line = run_cli(config, "describe-backups", "--output", "text", "--query", "Backups[].BackupId").stdout
    assert ids_line == "\t".join(ids) + "\n"  # a list of scalars is one tab-separated line, as in the AWS CLI


def test_query_selects_and_a_bad_expression_is_a_bad_request(two_backups: tuple[Path, list[str]]) -> None:
    config, ids = two_backups
    named = run_cli(config, "describe-backups", "--query", "Backups[?Name=='nightly'].BackupId")
    assert named.json == [ids[1]]
    table = run_cli(config, "describe-backups", "--output", "table", "--query", "Backups[].{Id: BackupId, Name: Name}")
    assert table.stdout.splitlines() == ["Id" + " " * 24 + "Name", ids[0], f"{ids[1]}  nightly"]
    bad = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--query", "Backup.[")
    assert bad.returncode == EXIT_BAD_REQUEST and bad.error["Code"] == "BadRequest"
    assert "--query" in bad.error["Message"] and "JMESPath" in bad.error["Message"]
    assert len(run_cli(config, "describe-backups").json["Backups"]) == 2  # refused before any work


def test_filters_in_the_aws_form(two_backups: tuple[Path, list[str]]) -> None:
    config, ids = two_backups

    def found(*args: str) -> list[str]:
        result = run_cli(config, "describe-backups", *args, "--query", "Backups[].BackupId")
        assert result.returncode == 0, result.stderr
        return result.json

    assert found("--filters", "Name=file-system-id,Values=fs-other,fs-src") == ids
    assert found("--filters", "Name=file-system-id,Values=fs-other") == []
    assert found("--filters", "Name=backup-type,Values=USER_INITIATED", "Name=lifecycle,Values=AVAILABLE") == ids
    assert found("--filters", "Values=fs-src,Name=file-system-id") == ids
    assert found("--filters", '[{"Name": "file-system-id", "Values": ["fs-src"]}]') == ids
    assert found("--filters", "Name=backup-type,Values=AUTOMATIC", "--filter", "file-system-id=fs-src") == []
    for bad in ("Name=file-system-id", "Values=fs-src", "file-system-id=fs-src", "Name=a,Name=b,Values=x", "[1]", "[{"):
        result = run_cli(config, "describe-backups", "--filters", bad)
        assert result.returncode == EXIT_BAD_REQUEST and "--filters" in result.error["Message"], (bad, result.stderr)
    unknown = run_cli(config, "describe-backups", "--filters", "Name=colour,Values=red")
    assert unknown.returncode == EXIT_BAD_REQUEST and "colour" in unknown.error["Message"]


def test_client_request_tokens_as_fsx_takes_them(xfs_dir: Path, tmp_path: Path) -> None:
    (xfs_dir / "f").write_text("x")
    config = write_config(tmp_path, {"src": xfs_dir})
    token = "Run_2026.11.30-" + "a" * 48  # 63 characters, every allowed kind
    args = ("create-backup", "--file-system-id", "fs-src", "--client-request-token", token, "--tag", "k=v")
    first = run_cli(config, *args)
    assert first.returncode == 0, first.stderr
    assert run_cli(config, *args).json["Backup"]["BackupId"] == first.json["Backup"]["BackupId"]
    for other in (("--name", "different"), ("--tag", "k2=v")):
        reused = run_cli(config, *args[:-2], *other)
        assert reused.returncode == EXIT_BAD_REQUEST, reused.stderr
        assert reused.error["Code"] == "IncompatibleParameterError" and token in reused.error["Message"]
    for bad in ("", "a" * 64, "has space", "semi;colon", "é"):
        refused = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--client-request-token", bad)
        assert (refused.returncode, refused.error["Code"]) == (EXIT_BAD_REQUEST, "BadRequest"), bad
        assert "--client-request-token" in refused.error["Message"]
    assert len(run_cli(config, "describe-backups").json["Backups"]) == 1


def test_tags_follow_fsx_rules(xfs_dir: Path, tmp_path: Path) -> None:
    """``@`` is a tag character; tags given to create-backup replace the file system's (CopyTagsToBackups)."""
    (xfs_dir / "f").write_text("x")
    fs_tags = {"team": "storage", "owner": "ops@example.com"}
    config = write_config(tmp_path, {"src": xfs_dir}, extra_fs={"tags": fs_tags, "copy_tags_to_backups": True})
    copied = run_cli(config, "create-backup", "--file-system-id", "fs-src")
    assert copied.returncode == 0, copied.stderr
    assert copied.json["Backup"]["Tags"] == [{"Key": k, "Value": v} for k, v in sorted(fs_tags.items())]
    given = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--tag", "contact@team=me@example.com")
    assert given.returncode == 0, given.stderr
    assert given.json["Backup"]["Tags"] == [{"Key": "contact@team", "Value": "me@example.com"}]
    named = run_cli(config, "create-backup", "--file-system-id", "fs-src", "--name", "for ops@example.com")
    assert named.returncode == 0 and named.json["Backup"]["Name"] == "for ops@example.com", named.stderr


# ------------------------------------------------------------ generated documentation
def _every_option() -> dict[str, set[str]]:
    """Each command path of the real parser with its visible long options: what the generated files must cover."""
    return {
        c.name: {s for a in c.options() for s in a.option_strings if s.startswith("--")}
        for c in commands(build_parser())
    }


def test_bash_completion_is_generated_from_the_parser(tmp_path: Path) -> None:
    result = _cli("completion", "bash")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "zfsbackd.bash"
    script.write_text(result.stdout)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        probe = f"source {script}; COMP_WORDS=(zfsbackd {line}); COMP_CWORD={len(words)}; _zfsbackd"
        probe += '; echo "${COMPREPLY[@]}"'
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout.split()

    top = complete("")
    assert {"create-backup", "describe-backups", "store", "completion", "--output", "--query"} <= set(top)
    assert complete("store", "")[0] == "init"
    assert complete("describe-backups", "--output", "") == ["json", "table", "text"]
    assert set(complete("describe-backups", "--fil")) == {"--filter", "--filters"}
    assert complete("completion", "")[:2] == ["bash", "zsh"]
    for name, options in _every_option().items():
        words = complete(*name.split(), "") if name else top
        assert options <= set(words), (name, options - set(words))


def test_zsh_completion_and_man_page_cover_every_option(tmp_path: Path) -> None:
    zsh_script = _cli("completion", "zsh").stdout
    assert zsh_script.startswith("#compdef zfsbackd\n")
    assert shutil.which("zsh"), "zsh is installed by scripts/setup-env.sh"
    assert subprocess.run(["zsh", "-n"], input=zsh_script, text=True).returncode == 0
    page = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build-manpage.py"), "--date", "2026-01-01"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert page.startswith('.TH ZFSBACKD 8 "2026-01-01"')
    for name, options in _every_option().items():
        for option in options:
            assert f"'{option}:" in zsh_script, (name, option)
            assert option.replace("-", "\\-") in page, (name, option)
        if name:
            assert f'"{name}"' in zsh_script
            if not any(c.name.startswith(name + " ") for c in commands(build_parser())):
                assert f'.SS "zfsbackd {name.replace("-", chr(92) + "-")}"' in page, name
    if shutil.which("man"):
        (tmp_path / "zfsbackd.8").write_text(page)
        rendered = subprocess.run(["man", "-l", str(tmp_path / "zfsbackd.8")], capture_output=True, text=True)
        assert rendered.returncode == 0 and "describe-backups" in rendered.stdout, rendered.stderr
