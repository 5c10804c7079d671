"""One installed namespace (issue 19): a wheel built with `python -m build` puts only `changeflow*` into
site-packages, and the command and the library import from it. The layers are import-linter's contracts."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_built_wheel_installs_one_top_level_name_and_works_from_it(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist),
                            str(REPO)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    (wheel,) = dist.glob("changeflow-*.whl")

    fresh = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(fresh)
    python = fresh / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # The dependencies come from this venv (a path line only: its .pth files, the editable install's finder
    # among them, are not run), so nothing is downloaded and only the wheel's own files are new.
    (site / "_changeflow_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    before = set(p.name for p in site.iterdir())
    installed = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    added = sorted(set(p.name for p in site.iterdir()) - before)
    assert added and all(name.startswith("changeflow") for name in added), added

    imported = subprocess.run([str(python), "-c", "import changeflow.sinks, changeflow.schemas._codec as c; "
                               "print(changeflow.sinks.__file__); print(c.__file__)"],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert imported.returncode == 0, imported.stderr
    assert all(line.startswith(str(site / "changeflow")) for line in imported.stdout.split()), imported.stdout
    helped = subprocess.run([str(fresh / "bin" / "changeflow"), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "change data capture" in helped.stdout


def test_the_layers_hold() -> None:
    """`lint-imports`: the CLI on top, settings at the bottom; stores independent; reports off the stream."""
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout
