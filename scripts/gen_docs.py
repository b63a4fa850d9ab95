"""Regenerate the option tables in README.md (and docs/) from fastlb/settings.py.

Usage: python scripts/gen_docs.py [--check]
With --check, exit 1 when a file is out of date instead of rewriting it.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastlb.settings import settings_reference  # noqa: E402

BLOCK = re.compile(r"(<!-- options: [^\n]*-->\n).*?(<!-- /options -->)", re.S)
FILES = [ROOT / "README.md", ROOT / "docs" / "design.md"]


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for path in FILES:
        if not path.exists():
            continue
        text = path.read_text()
        updated = BLOCK.sub(lambda m: m.group(1) + settings_reference() + "\n" + m.group(2), text)
        if updated != text:
            stale.append(path)
            if not check:
                path.write_text(updated)
    if check and stale:
        print("out of date (run python scripts/gen_docs.py): %s" % ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
