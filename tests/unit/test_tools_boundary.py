"""The daemon's import path holds none of the tools, and a tool whose extra is missing says
which extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

TOOL_IMPORTS = (
    "matplotlib",
    "amqtt",
    "controller.tools.report",
    "controller.tools.demo",
    "controller.tools.broker",
    "controller.tools.bench.site_run",
)


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_daemon_path_imports_no_tool() -> None:
    done = _python(
        """
        import json, sys
        from controller.cli import build_parser
        import controller.app
        build_parser()
        print(json.dumps(sorted(sys.modules)))
        """
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert not [m for m in loaded if m.startswith(TOOL_IMPORTS)]
    assert "controller.app" in loaded  # the probe saw the daemon's modules


def test_a_missing_extra_is_named(tmp_path: Path) -> None:
    # A run directory whose report needs a plot, on an interpreter without matplotlib.
    (tmp_path / "truth.jsonl").write_text('{"t": 1.0, "site_kw": 1.0}\n')
    (tmp_path / "run.json").write_text(
        json.dumps({"format": "rampd-run/1", "name": "x", "site_max_kw": 10.0, "dispatches": []})
    )
    done = _python(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class NoMatplotlib(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "matplotlib":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, NoMatplotlib())
        from controller.cli import main
        sys.exit(main(["report", sys.argv[1]]))
        """,
        str(tmp_path),
    )
    assert done.returncode == 2, done.stderr
    assert "rampd[tools]" in done.stderr and "matplotlib" in done.stderr
