#!/usr/bin/env python3
"""Write zfsbackd(8) in roff, generated from the CLI's argparse parser (zfsbackd.clidoc).

Usage: build-manpage.py [--date YYYY-MM-DD] [OUTPUT]   (default: standard output)

The page is never written by hand, so it cannot disagree with ``zfsbackd --help``;
scripts/build-deb.sh runs this with the packaged interpreter. ``--date`` (or
``SOURCE_DATE_EPOCH``) pins the date in the page header, so that two builds of
the same commit give the same package.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout run without installing

from zfsbackd import __version__
from zfsbackd.cli import build_parser
from zfsbackd.clidoc import manpage


def main() -> int:
    options = argparse.ArgumentParser(description="Render zfsbackd(8) from the command-line parser.")
    options.add_argument("output", nargs="?", help="file to write (default: standard output)")
    options.add_argument("--date", type=datetime.date.fromisoformat, help="date in the header (YYYY-MM-DD)")
    args = options.parse_args()
    date = args.date
    if date is None and os.environ.get("SOURCE_DATE_EPOCH"):
        date = datetime.datetime.fromtimestamp(int(os.environ["SOURCE_DATE_EPOCH"]), datetime.UTC).date()
    page = manpage(build_parser(), __version__, date)
    if args.output:
        Path(args.output).write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
