"""Validators for identifiers and labels that people and scripts type.

The CLI, the control socket and the config loader all accept the same backup
ids, names, tags and file system ids; the rules live here once so that a value
refused on one path is refused, with the same words, on every other.  Every
failure raises :class:`~zfsbackd.errors.BadRequest` whose message names where
the value came from (an option such as ``--tag`` or a config key path such as
``file_systems[0].tags``), what is wrong with it and how to fix it.

The character rules follow FSx/AWS tags: letters (any script), digits, spaces
and ``. + - = _ : / @``.  "Spaces" means Unicode space separators; tabs, new
lines and other control characters are refused because they break tables,
logs and shell scripts that print these values.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping

from zfsbackd.errors import BadRequest

# ``\Z`` rather than ``$`` so that ``.match`` does not accept a trailing new line.
BACKUP_ID_RE = re.compile(r"^backup-[0-9a-f]{17}\Z")
FILE_SYSTEM_ID_RE = re.compile(r"^fs-[a-z0-9][a-z0-9-]{0,62}\Z")
#: FSx's ClientRequestToken: 1 to 63 ASCII letters, digits, ``_ . -`` (safe in file names, logs and URLs)
CLIENT_REQUEST_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.-]{1,63}\Z")

MAX_NAME_LENGTH = 256
MAX_TAGS = 50
MAX_TAG_KEY_LENGTH = 128
MAX_TAG_VALUE_LENGTH = 256
RESERVED_TAG_PREFIX = "aws:"

_PUNCTUATION = frozenset(".+-=_:/@")
_ALLOWED_DESCRIPTION = "letters, digits, spaces and . + - = _ : / @"
_SHOW_LIMIT = 60


def describe_value(value: object) -> str:
    """Name a value's kind and content the way a person wrote it, for error messages.

    YAML turns unquoted ``yes``, ``7`` or ``02:30`` into booleans and numbers;
    saying "got the number 150" rather than "got 150" tells the reader why a
    value they typed as text was refused.
    """
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {show(value)}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def show(value: str) -> str:
    """Quote user input for a message, shortened so a pasted blob cannot flood the terminal."""
    if len(value) > _SHOW_LIMIT:
        value = value[:_SHOW_LIMIT] + "…"
    return repr(value)


def _bad_characters(text: str) -> list[str]:
    """Return the distinct characters of ``text`` outside the tag/name set, in order of appearance."""
    bad: list[str] = []
    for char in text:
        category = unicodedata.category(char)
        allowed = category[0] in "LN" or category == "Zs" or char in _PUNCTUATION
        if not allowed and char not in bad:
            bad.append(char)
    return bad


def _describe_characters(chars: list[str]) -> str:
    """Render refused characters with code points, since many of them are invisible."""
    return ", ".join(f"{char!r} (U+{ord(char):04X})" for char in chars)


def validate_backup_id(value: str, where: str = "--backup-id") -> str:
    """Return ``value`` if it is a backup id (``backup-`` and 17 lowercase hex digits)."""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: expected a backup id, got {describe_value(value)}; "
                         "write it as backup- followed by 17 lowercase hex digits")
    if BACKUP_ID_RE.match(value):
        return value
    hint = ""
    if BACKUP_ID_RE.match(value.strip().lower()):
        hint = f" (did you mean {value.strip().lower()}?)"
    raise BadRequest(
        f"{where}: {show(value)} is not a backup id{hint}; a backup id is backup- followed by "
        "17 lowercase hex digits, e.g. backup-0123456789abcdef0; list them with describe-backups"
    )


def validate_backup_name(value: str, where: str = "--name") -> str:
    """Return ``value`` if it is a usable backup name (1 to 256 tag characters).

    An empty name is refused: it is always a scripting mistake (an unset
    variable), and leaving the option out gives the same result on purpose.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{where}: expected text, got {describe_value(value)}; quote the name")
    if not value:
        raise BadRequest(f"{where}: the name is empty; give a name of 1 to {MAX_NAME_LENGTH} "
                         "characters or leave the option out")
    if len(value) > MAX_NAME_LENGTH:
        raise BadRequest(f"{where}: the name is {len(value)} characters long, at most "
                         f"{MAX_NAME_LENGTH} are allowed; shorten it")
    bad = _bad_characters(value)
    if bad:
        raise BadRequest(f"{where}: the name {show(value)} contains {_describe_characters(bad)}, "
                         f"which is not allowed; use only {_ALLOWED_DESCRIPTION}")
    return value


def tag_problems(tags: Mapping[object, object], where: str = "tags") -> list[str]:
    """List every problem with a set of tags, each message starting with ``where``.

    Returned as a list (not raised) so the config loader can report all of them
    next to its other problems; :func:`validate_tags` raises them together.
    Keys and values arrive untyped because YAML and JSON can hand over numbers
    or booleans where the user meant text.
    """
    problems: list[str] = []
    if len(tags) > MAX_TAGS:
        problems.append(f"{where}: {len(tags)} tags, at most {MAX_TAGS} are allowed; "
                        f"remove {len(tags) - MAX_TAGS} of them")
    for key, value in tags.items():
        if not isinstance(key, str):
            problems.append(f"{where}: tag key {describe_value(key)} is not text; quote the key")
            continue
        label = show(key)
        if not key:
            problems.append(f"{where}: a tag key is empty; give every tag a key of 1 to "
                            f"{MAX_TAG_KEY_LENGTH} characters")
        elif len(key) > MAX_TAG_KEY_LENGTH:
            problems.append(f"{where}: tag key {label} is {len(key)} characters long, at most "
                            f"{MAX_TAG_KEY_LENGTH} are allowed; shorten it")
        if key.lower().startswith(RESERVED_TAG_PREFIX):
            problems.append(f"{where}: tag key {label} starts with {RESERVED_TAG_PREFIX!r}, which is "
                            "reserved; rename the tag")
        bad = _bad_characters(key)
        if bad:
            problems.append(f"{where}: tag key {label} contains {_describe_characters(bad)}, which is "
                            f"not allowed; use only {_ALLOWED_DESCRIPTION}")
        if not isinstance(value, str):
            problems.append(f"{where}: the value of tag {label} is {describe_value(value)}, not text; "
                            "quote the value")
            continue
        if len(value) > MAX_TAG_VALUE_LENGTH:
            problems.append(f"{where}: the value of tag {label} is {len(value)} characters long, at "
                            f"most {MAX_TAG_VALUE_LENGTH} are allowed; shorten it")
        bad = _bad_characters(value)
        if bad:
            problems.append(f"{where}: the value of tag {label} contains {_describe_characters(bad)}, "
                            f"which is not allowed; use only {_ALLOWED_DESCRIPTION}")
    return problems


def validate_tags(tags: Mapping[str, str], where: str = "tags") -> dict[str, str]:
    """Return a copy of ``tags`` if every key and value is valid; otherwise raise all problems at once."""
    problems = tag_problems(tags, where)
    if problems:
        raise BadRequest("\n".join(problems))
    return dict(tags)


def parse_tags(pairs: Iterable[str], where: str = "--tag") -> dict[str, str]:
    """Turn repeated ``KEY=VALUE`` options into a tag mapping.

    The value is everything after the first ``=`` (values may contain ``=``).
    A key given twice is refused rather than silently keeping the last one,
    because a script that does it has a bug the user wants to hear about.
    """
    problems: list[str] = []
    tags: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            problems.append(f"{where}: {show(pair)} is not KEY=VALUE; write it as "
                            f"{where} {key or 'team'}=VALUE (the value may be empty: {key or 'team'}=)")
            continue
        if key in tags:
            problems.append(f"{where}: tag key {show(key)} is given more than once; give each key once")
            continue
        tags[key] = value
    problems.extend(tag_problems(tags, where))
    if problems:
        raise BadRequest("\n".join(problems))
    return tags


def validate_file_system_id(value: str, where: str = "--file-system-id") -> str:
    """Return ``value`` if it is a file system id (``fs-`` and 1 to 63 lowercase letters, digits, hyphens)."""
    if not isinstance(value, str):
        raise BadRequest(f"{where}: expected a file system id such as fs-home, got "
                         f"{describe_value(value)}")
    if FILE_SYSTEM_ID_RE.match(value):
        return value
    hint = ""
    for candidate in (value.strip().lower(), "fs-" + value.strip().lower()):
        if FILE_SYSTEM_ID_RE.match(candidate):
            hint = f" (did you mean {candidate}?)"
            break
    raise BadRequest(
        f"{where}: {show(value)} is not a file system id{hint}; a file system id is fs- followed by "
        "1 to 63 lowercase letters, digits and hyphens, starting with a letter or digit, e.g. fs-home"
    )


def validate_client_request_token(value: str, where: str = "--client-request-token") -> str:
    """Return ``value`` if it is a client request token as FSx takes it (1 to 63 of ``A-Z a-z 0-9 _ . -``).

    The token is stored in the backup record and compared byte for byte on a
    retry, so characters that a shell, a log or another tool might change
    (spaces, non-ASCII look-alikes) are refused up front rather than making a
    retry miss its earlier request.
    """
    if not isinstance(value, str):
        raise BadRequest(f"{where}: expected text, got {describe_value(value)}; quote the token")
    if CLIENT_REQUEST_TOKEN_RE.match(value):
        return value
    reason = "is empty" if not value else (
        f"is {len(value)} characters long" if len(value) > 63 else "contains other characters"
    )
    raise BadRequest(
        f"{where}: {show(value)} {reason}; a client request token is 1 to 63 ASCII letters, digits, "
        "'_', '.' and '-', e.g. a UUID (uuidgen)"
    )
