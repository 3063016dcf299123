"""Regenerate the README's screenshots of the web page (docs/*.png).

They are taken by the browser tests themselves (tests/serve/test_ui_browser.py: a tiny random model, random
adapters, real short training runs), so the pictures show exactly what the tests checked. Needs the test extras
and /usr/bin/chromium (``bash scripts/setup.sh`` installs both). Usage: ``python scripts/screenshots.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    env = {**os.environ, "LORAKIT_SCREENSHOTS": str(ROOT / "docs"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/serve/test_ui_browser.py"]
    status = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    if status == 0:
        print("screenshots:", ", ".join(sorted(p.name for p in (ROOT / "docs").glob("*.png"))))
    return status


if __name__ == "__main__":
    sys.exit(main())
