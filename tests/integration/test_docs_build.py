"""The documentation site builds with ``mkdocs build --strict``: no broken links or anchors,
no page missing from the nav (mkdocs.yml at the repository root; needs the ``docs`` or ``dev`` extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=50,
    )
    output = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert "WARNING" not in proc.stderr, output
    for page in ("index.html", "cli/index.html", "integrations/index.html", "reader/index.html"):
        assert (site / page).is_file(), f"{page} missing\n{output}"
    for example in ("wsgi_app.py", "tasks.py", "consumer_script.py", "gevent_app.py"):
        assert (site / "examples" / example).is_file(), f"examples/{example} not published\n{output}"
