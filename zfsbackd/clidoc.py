"""The man page and the bash/zsh completions, generated from the argparse parser.

There is one description of the command line, ``zfsbackd.cli.build_parser``;
everything here walks it, so a new command or option shows up in the man page
and in completion without a second list to keep in sync. What the parser does
not know is only what kind of value an option takes for completion purposes
(a file, a directory), keyed by the option's destination name.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Iterator
from dataclasses import dataclass

#: options whose value is a path, by argparse ``dest``: completion offers files or directories for them
PATH_VALUES = {"config": "file", "key_file": "file", "target": "directory"}

#: the global options (zfsbackd.cli._global_options), listed once in the man page, not under every command
GLOBAL_DESTS = frozenset({"config", "output", "query", "verbose", "no_daemon", "help", "version"})


@dataclass(frozen=True)
class Command:
    """One level of the command tree: ``path`` is ``()`` for the top, ``("store", "init")`` for a leaf."""

    path: tuple[str, ...]
    help: str
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.path)

    def subcommands(self) -> dict[str, str]:
        """The subcommand names with their one-line help, in the parser's order."""
        for action in self.parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return {choice.dest: choice.help or "" for choice in action._choices_actions}
        return {}

    def options(self, *, include_global: bool = True) -> list[argparse.Action]:
        """Options shown to people (not SUPPRESSed ones such as the daemon's test-only --tick-seconds)."""
        return [
            a
            for a in self.parser._actions
            if a.option_strings and a.help != argparse.SUPPRESS and (include_global or a.dest not in GLOBAL_DESTS)
        ]

    def positionals(self) -> list[argparse.Action]:
        return [
            a
            for a in self.parser._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        ]


def commands(parser: argparse.ArgumentParser) -> Iterator[Command]:
    """Every level of the command tree, parents before children, in the parser's order."""
    pending = [Command((), parser.description or "", parser)]
    while pending:
        command = pending.pop(0)
        yield command
        for action in command.parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {c.dest: c.help or "" for c in action._choices_actions}
                pending[:0] = [Command((*command.path, n), helps.get(n, ""), p) for n, p in action.choices.items()]


def _invocation(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """How argparse itself writes the option in --help (``--output {json,table,text}``)."""
    return parser._get_formatter()._format_action_invocation(action)


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


# ------------------------------------------------------------------- man page
def _roff(text: str) -> str:
    """Escape text for roff: backslashes, hyphens of options, and control characters at line starts."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.splitlines())


def manpage(parser: argparse.ArgumentParser, version: str, date: datetime.date | None = None) -> str:
    """zfsbackd(8) in roff, every command and option taken from ``parser``."""
    day = (date or datetime.date.today()).isoformat()
    tree = list(commands(parser))
    top = tree[0]
    out = [
        f'.TH ZFSBACKD 8 "{day}" "zfsbackd {version}" "System Administration"',
        ".SH NAME",
        "zfsbackd \\- snapshot backups of ZFS, btrfs and XFS file systems to object storage",
        ".SH SYNOPSIS",
        ".B zfsbackd",
        "[\\fIGLOBAL OPTIONS\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        _roff(top.help),
        "Every command prints JSON on standard output (see \\fB\\-\\-output\\fR and \\fB\\-\\-query\\fR); "
        'errors print {"Error": {"Code", "Message"}} on standard error with a documented exit status. '
        "Global options may be given before or after the command.",
        ".SH GLOBAL OPTIONS",
    ]
    for action in top.options():
        out += [".TP", f"\\fB{_roff(_invocation(parser, action))}\\fR", _roff(action.help or "")]
    out.append(".SH COMMANDS")
    for command in tree[1:]:
        if command.subcommands():
            continue  # a group (config, store, key): its leaves are listed with their full names
        out += [f'.SS "zfsbackd {_roff(command.name)}"', _roff(command.help)]
        for action in command.positionals():
            out += [".TP", f"\\fI{_roff(action.dest)}\\fR", _roff(f"one of: {', '.join(action.choices or ())}")]
        for action in command.options(include_global=False):
            text = (action.help or "") + (" (required)" if action.required else "")
            out += [".TP", f"\\fB{_roff(_invocation(command.parser, action))}\\fR", _roff(text)]
    out += [
        ".SH EXIT STATUS",
        "0 on success; otherwise the code of the error class, as listed in README.md (\"Exit codes\"): "
        "2 bad request or configuration, 3 not found, 4 conflict, 5 store or daemon unreachable, "
        "6 integrity error, 7 backup failed, 8 restore target full, 130 interrupted, 1 a bug.",
        ".SH ENVIRONMENT",
        ".TP",
        ".B ZFSBACKD_CONFIG",
        "the configuration file when \\fB\\-\\-config\\fR is not given.",
        ".SH FILES",
        ".TP",
        ".I /etc/zfsbackd/zfsbackd.yaml",
        "the configuration (mode 0600); every key is explained in the example shipped with the documentation.",
        ".TP",
        ".I /var/lib/zfsbackd",
        "state (locks, caches) and the default local store.",
        ".SH SEE ALSO",
        ".BR systemctl (1),",
        ".BR journalctl (1),",
        ".I /usr/share/doc/zfsbackd/README.md",
    ]
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------- completion
def _value_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every option that takes a value, by option string, across the whole tree (one meaning per name)."""
    found: dict[str, argparse.Action] = {}
    for command in commands(parser):
        for action in command.options():
            if _takes_value(action):
                found.update({s: action for s in action.option_strings})
    return found


def _words(command: Command) -> dict[str, str]:
    """What may follow at this level: subcommands, positional choices and options, with their help."""
    words = dict(command.subcommands())
    for action in command.positionals():
        words.update({str(c): action.help or action.dest for c in action.choices or ()})
    for action in command.options():
        words.update({s: action.help or "" for s in action.option_strings if s.startswith("--")})
    return words


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` ("bash" or "zsh")."""
    return _bash(parser) if shell == "bash" else _zsh(parser)


def _paths_pattern(parser: argparse.ArgumentParser) -> str:
    """A shell case pattern matching every command path ("create-backup", "store init", …)."""
    return "|".join(f'"{c.name}"' for c in commands(parser) if c.path)


@dataclass(frozen=True)
class _Replies:
    """How one shell offers an option's value: ``words`` (formatted with them), files, directories, or nothing."""

    words: str
    file: str
    directory: str
    nothing: str
    pattern: str  # a case pattern, formatted with ``option``


_BASH = _Replies(
    'COMPREPLY=($(compgen -W "{words}" -- "$cur"))',
    'COMPREPLY=($(compgen -f -- "$cur"))',
    'COMPREPLY=($(compgen -d -- "$cur"))',
    "COMPREPLY=()",
    "{option})",
)
_ZSH = _Replies("compadd -- {words}", "_files", "_files -/", ":", "({option})")


def _value_cases(parser: argparse.ArgumentParser, replies: _Replies) -> list[str]:
    """One case branch per value-taking option: what to offer when the previous word is that option."""
    cases = []
    for option, action in sorted(_value_options(parser).items()):
        kind = PATH_VALUES.get(action.dest)
        if action.choices:
            reply = replies.words.format(words=" ".join(map(str, action.choices)))
        else:
            reply = {"file": replies.file, "directory": replies.directory}.get(kind or "", replies.nothing)
        cases.append(f"        {replies.pattern.format(option=option)} {reply}; return ;;")
    return cases


def _bash(parser: argparse.ArgumentParser) -> str:
    value_cases = _value_cases(parser, _BASH)
    word_cases = [f'        "{c.name}") words="{" ".join(_words(c))}" ;;' for c in commands(parser)]
    paths = _paths_pattern(parser)
    return "\n".join(
        [
            "# bash completion for zfsbackd; generated by `zfsbackd completion bash` from its argument parser",
            "_zfsbackd() {",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}" path="" words="" i',
            "    for ((i = 1; i < COMP_CWORD; i++)); do",
            '        case "${path:+$path }${COMP_WORDS[i]}" in',
            f'            {paths}) path="${{path:+$path }}${{COMP_WORDS[i]}}" ;;',
            "        esac",
            "    done",
            '    case "$prev" in',
            *value_cases,
            "    esac",
            '    case "$path" in',
            *word_cases,
            "    esac",
            '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
            "}",
            "complete -F _zfsbackd zfsbackd",
            "",
        ]
    )


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh(parser: argparse.ArgumentParser) -> str:
    value_cases = _value_cases(parser, _ZSH)
    word_cases = []
    for command in commands(parser):
        items = " ".join(
            _zsh_quote(word.replace(":", "\\:") + ":" + " ".join(help_text.split()))
            for word, help_text in _words(command).items()
        )
        word_cases.append(f'        ("{command.name}") items=({items}) ;;')
    paths = _paths_pattern(parser)
    return "\n".join(
        [
            "#compdef zfsbackd",
            "# zsh completion for zfsbackd; generated by `zfsbackd completion zsh` from its argument parser",
            "_zfsbackd() {",
            "    local i p=\"\" prev=${words[CURRENT-1]}",
            "    local -a items",
            "    for ((i = 2; i < CURRENT; i++)); do",
            '        case "${p:+$p }${words[i]}" in',
            f'            ({paths}) p="${{p:+$p }}${{words[i]}}" ;;',
            "        esac",
            "    done",
            "    case $prev in",
            *value_cases,
            "    esac",
            '    case "$p" in',
            *word_cases,
            "    esac",
            "    _describe -t commands zfsbackd items",
            "}",
            '_zfsbackd "$@"',
            "",
        ]
    )
