"""How a command's result is printed: ``--output json | table | text``, after ``--query``.

The three formats follow the AWS CLI so that scripts written for ``aws fsx``
carry over: ``json`` is the document itself; ``text`` is tab-separated lines
for ``cut``/``awk``, laid out by the AWS CLI's own rules (one line per object
with its scalar values in sorted-key order, nested lists of objects on lines
of their own prefixed with the key in capitals, every object of a list
sharing one set of columns so that a column means the same on every line);
``table`` is aligned columns for people. In ``table`` and ``text`` an absent
or null value is an empty cell, never ``None``, so a column's position does
not move and a missing name does not read as a name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

#: the columns people want first for backups; other keys stay in the JSON output
BACKUP_COLUMNS = ("BackupId", "FileSystemId", "Type", "Lifecycle", "CreationTime", "SizeInBytes", "Name")


def cell(value: Any) -> str:
    """One value as a table or text cell: null and absent are empty; booleans as the AWS CLI prints them."""
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return str(value)


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list)


def render(data: Any, output: str) -> str:
    """The text to print for ``data`` in ``output`` format, without the final new line."""
    if output == "text":
        return "\n".join(_text_lines(data))
    if output == "table":
        return _table_of(data)
    return json.dumps(data, indent=2, ensure_ascii=False)


# ----------------------------------------------------------------------- text
def _text_lines(item: Any, identifier: str | None = None, columns: Sequence[str] | None = None) -> list[str]:
    """The AWS CLI's text layout (awscli/text.py), with empty cells for null and absent values."""
    if isinstance(item, dict):
        if columns is None:
            columns = sorted(k for k, v in item.items() if _is_scalar(v))
        scalars = [cell(item.get(k)) for k in columns]
        lines = ["\t".join(([identifier.upper()] if identifier else []) + scalars)] if scalars else []
        for key in sorted(k for k in item if k not in columns):
            lines += _text_lines(item[key], identifier=key)
        return lines
    if isinstance(item, list):
        if not item:
            return []
        if any(isinstance(e, dict) for e in item):
            shared = sorted({k for e in item if isinstance(e, dict) for k, v in e.items() if _is_scalar(v)})
            return [line for e in item for line in _text_lines(e, identifier, shared if isinstance(e, dict) else None)]
        scalars = [e for e in item if _is_scalar(e)]
        lines = []
        if scalars and identifier:
            lines += [f"{identifier.upper()}\t{cell(e)}" for e in scalars]
        elif scalars:
            lines.append("\t".join(cell(e) for e in scalars))
        return lines + [line for e in item if not _is_scalar(e) for line in _text_lines(e, identifier)]
    return [cell(item)]


# ---------------------------------------------------------------------- table
def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Aligned columns with a header line; absent and null values are empty cells."""
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = [[c.ljust(w) for c, w in zip(columns, widths, strict=True)]]
    lines += [[v.ljust(w) for v, w in zip(r, widths, strict=True)] for r in cells]
    return "\n".join("  ".join(line).rstrip() for line in lines)


def _scalar_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every scalar key of ``rows`` in order of first appearance (people read the API's order)."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k, v in row.items() if _is_scalar(v) and k not in columns]
    return columns


def _table_of(data: Any) -> str:
    """A table for any result: the backup columns for backups, else the scalar fields of each object."""
    if isinstance(data, dict) and isinstance(data.get("Backups"), list):
        return table(data["Backups"], BACKUP_COLUMNS)
    if isinstance(data, dict) and isinstance(data.get("Backup"), dict):
        return table([data["Backup"]], BACKUP_COLUMNS[:-1])
    if isinstance(data, list):
        if data and all(isinstance(e, dict) for e in data):
            return table(data, _scalar_columns(data))
        return "\n".join("  ".join(cell(v) for v in e) if isinstance(e, list) else cell(e) for e in data)
    if not isinstance(data, dict):
        return cell(data)
    parts: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            scalars = {k: v for k, v in value.items() if _is_scalar(v)}
            if scalars:
                parts.append(table([scalars], list(scalars)))
            for k, v in value.items():
                if isinstance(v, list):
                    parts.append(f"{k}:" + ("".join(f"\n  - {cell(item)}" for item in v) if v else " none"))
        else:
            parts.append(f"{key}: {cell(value)}")
    return "\n".join(parts)
