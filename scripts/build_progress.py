"""Shows a compile's progress from its verbose output, keeping the full output in a log file.

Usage: <build command> 2>&1 | python scripts/build_progress.py LOGFILE

Ninja prints "[n/N] ..." per build step; this turns those lines into one progress line (redrawn
on a terminal, every 10 % otherwise) and passes through the few lines a person wants to see.
Exits non-zero when the input is empty.
"""

from __future__ import annotations

import re
import sys

STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s+(.*)$")
SOURCE = re.compile(r"-c\s+\S*/([^/\s]+)\s*$")
NOTABLE = re.compile(r"\*\*\* |^\s*(error|ERROR)|Successfully built|Saved ")


def main() -> int:
    tty = sys.stderr.isatty()
    last_decile = -1
    seen = False
    with open(sys.argv[1], "w", encoding="utf-8") as log:
        for line in sys.stdin:
            seen = True
            log.write(line)
            step = STEP.match(line)
            if step:
                done, total = int(step[1]), int(step[2])
                source = SOURCE.search(step[3])
                what = source[1] if source else step[3].split(" ")[0].rsplit("/", 1)[-1]
                fraction = done / total
                if tty:
                    bar = "#" * int(30 * fraction)
                    sys.stderr.write(f"\r  compiling [{bar:<30}] {done}/{total} {what[:40]:<40}")
                    sys.stderr.flush()
                elif int(fraction * 10) > last_decile:
                    last_decile = int(fraction * 10)
                    sys.stderr.write(f"  compiling: {done}/{total} steps ({fraction:.0%})\n")
            elif NOTABLE.search(line):
                if tty:
                    sys.stderr.write("\n")
                sys.stderr.write("  " + line.strip()[:200] + "\n")
    if tty:
        sys.stderr.write("\n")
    return 0 if seen else 1


if __name__ == "__main__":
    sys.exit(main())
