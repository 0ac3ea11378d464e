"""Rewrite the presets still in the older flat form in today's, by section (:func:`upgrade_preset`):
``python -m nbsrc.presets.rewrite`` (prints the files it rewrote; a preset already in today's form is
left as it is). What each preset configures is unchanged, which ``tests/test_presets.py`` checks."""

from __future__ import annotations

import json
import sys

from nbsrc.presets import PRESETS_DIR, upgrade_preset


def main() -> int:
    for path in sorted(PRESETS_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        if "format" in d:
            continue
        path.write_text(json.dumps(upgrade_preset(d), indent=2, ensure_ascii=False) + "\n")
        print(f"rewrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
