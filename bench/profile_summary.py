#!/usr/bin/env python3
"""Summarise a py-spy collapsed-stack file (``run.py --profile`` writes them).

    python3 bench/profile_summary.py bench/results/<stamp>-logs/profiles/small/zfsbackd-full.txt [--top 25]

Prints, per thread group (main, zfsbackd-read, zfsbackd-upload, ...), the share of samples
and the functions with the most samples on top of the stack ("self") and anywhere in it
("total"). With ``--idle`` samples, time spent waiting (I/O, locks, the GIL) shows up too.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_THREAD = re.compile(r"^thread \((\w+)\)(?:: (.*))?$")


def group_of(frame0: str) -> str:
    m = _THREAD.match(frame0)
    if not m:
        return "?"
    name = m.group(2) or m.group(1)
    return re.sub(r"_\d+$", "", name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    self_c: dict[str, Counter[str]] = defaultdict(Counter)
    total_c: dict[str, Counter[str]] = defaultdict(Counter)
    per_group: Counter[str] = Counter()
    threads: dict[str, set[str]] = defaultdict(set)
    all_n = 0
    with open(args.file) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            count = int(n)
            frames = stack.split(";")
            # py-spy: [process;]thread (0x..) "name";frame;frame... (outermost first)
            head = frames[0]
            if head.startswith("process "):
                frames = frames[1:]
                head = frames[0]
            tid = _THREAD.match(head)
            group = group_of(head)
            if tid:
                threads[group].add(tid.group(1))
            frames = [fr for fr in frames[1:] if fr]
            funcs = [re.sub(r" \(([^)]*/)?([^/)]*)\)$", r" (\2)", fr) for fr in frames]
            per_group[group] += count
            all_n += count
            if funcs:
                self_c[group][funcs[-1]] += count
                for fn in set(funcs):
                    total_c[group][fn] += count
    print(f"{all_n} samples")
    for group, n in per_group.most_common():
        print(f"\n== {group} ({len(threads[group])} threads): {n} samples, {100 * n / all_n:.1f}%")
        print("  self:")
        for fn, c in self_c[group].most_common(args.top):
            print(f"    {100 * c / n:5.1f}%  {fn}")
        print("  total:")
        for fn, c in total_c[group].most_common(args.top):
            print(f"    {100 * c / n:5.1f}%  {fn}")


if __name__ == "__main__":
    main()
