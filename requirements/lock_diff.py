"""Which pins a refresh would move: ``python requirements/lock_diff.py LOCKED NEWEST``.

Reads two requirement files written by ``uv pip compile`` (``name==version`` lines, with or
without environment markers and hashes), keeps the pins whose markers hold for this interpreter
(a universal lock has pins for other Pythons too), and prints every package whose version
differs, appeared or went away; ``make test-newest`` runs it before testing the newest releases.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.markers import Marker

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$")


def pins(path: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        m = _PIN.match(line)
        if m and (m.group(3) is None or Marker(m.group(3)).evaluate()):
            out.setdefault(m.group(1).lower().replace("_", "-"), set()).add(m.group(2))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    old, new = pins(argv[0]), pins(argv[1])
    changed = [
        (name, ", ".join(sorted(old.get(name, {"-"}))), ", ".join(sorted(new.get(name, {"-"}))))
        for name in sorted(set(old) | set(new))
        if not new.get(name, set()) <= old.get(name, set()) or name not in new
    ]
    print(f"{len(changed)} of {len(set(old) | set(new))} packages would move "
          f"({argv[0]} -> {argv[1]}):")  # fmt: skip
    for name, a, b in changed:
        print(f"  {name}: {a} -> {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
