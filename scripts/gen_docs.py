"""Regenerate the option tables in README.md (and docs/) from fastlb/settings.py.

Usage: python scripts/gen_docs.py [--check]
With --check, exit 1 when a file is out of date instead of rewriting it.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastlb.settings import SETTINGS, settings_reference  # noqa: E402

BLOCKS = {
    "options": re.compile(r"(<!-- options: [^\n]*-->\n).*?(<!-- /options -->)", re.S),
    "config": re.compile(r"(<!-- config: [^\n]*-->\n).*?(<!-- /config -->)", re.S),
}
FILES = [ROOT / "README.md", ROOT / "docs" / "design.md", ROOT / "docs" / "operations.md"]


def config_reference() -> str:
    """Every config-file key with its default, as a commented TOML file."""
    lines = ["```toml", 'listen = "0.0.0.0:8000"          # LB_PORT, or "ADDR:PORT" (sets --bind too)',
             'backends = ["8080", "10.0.0.2:8080", { address = "10.0.0.3:8080", weight = 2 }]',
             "# a backend table may also set backup = true and its own check-* and send-proxy",
             "# settings, e.g. { address = \"10.0.0.4:6379\", backup = true, check = \"tcp\" }", ""]
    for setting in SETTINGS:
        key = setting.flags[-1].lstrip("-")
        default = setting.default
        if isinstance(default, bool):
            value = "true" if default else "false"
        else:
            value = ('"%s"' % default) if isinstance(default, str) else repr(default)
        lines.append("# %s" % setting.help)
        lines.append("%s%s = %s" % ("# " if setting.shown_default == "off" else "", key, value))
    lines.append("```")
    return "\n".join(lines)


GENERATORS = {"options": settings_reference, "config": config_reference}


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for path in FILES:
        if not path.exists():
            continue
        text = path.read_text()
        updated = text
        for name, block in BLOCKS.items():
            updated = block.sub(lambda m: m.group(1) + GENERATORS[name]() + "\n" + m.group(2), updated)
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
