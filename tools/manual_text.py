#!/usr/bin/env python3
"""A second evaluation domain that is not encyclopedia prose: technical manual text, rendered from the man pages
installed on the machine (the GNU Bash reference manual by default, about 380 kB of English).

    python3 tools/manual_text.py -o bash-manual.txt

The text is rendered at a fixed width without formatting (``MANWIDTH=100 man -P cat PAGE | col -bx``, the page's
indentation and justification spaces removed), so the same man page gives the same bytes; the sha256 and the package version are printed so that a benchmark can quote them.
Nothing is shipped: the pages come from the system (Debian's bash package here).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path


def render(page: str) -> str:
    env = {**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"}
    raw = subprocess.run(["man", "-P", "cat", page], env=env, check=True, capture_output=True).stdout
    text = subprocess.run(["col", "-bx"], input=raw, check=True, capture_output=True).stdout.decode("utf-8", "replace")
    lines = [ln.rstrip() for ln in text.splitlines()]
    out, blank = [], False
    for ln in lines:  # squeeze runs of blank lines
        if not ln:
            if not blank:
                out.append("")
            blank = True
        else:
            ln = ln.strip() if not ln.startswith(" " * 7) else ln[7:]
            out.append(re.sub(r"(?<=\S) {2,}(?=\S)", " ", ln))  # justification spaces
            blank = False
    return "\n".join(out).strip() + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pages", nargs="*", default=["bash"], help="man pages to render (default: bash)")
    ap.add_argument("-o", "--output", required=True, help="text file to write")
    args = ap.parse_args()
    text = "\n".join(render(p) for p in args.pages)
    Path(args.output).write_text(text, encoding="utf-8")
    version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "bash"], capture_output=True, text=True).stdout
    print(f"wrote {args.output}: {len(text)} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}, "
          f"pages {', '.join(args.pages)} (bash package {version or 'unknown'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
