"""One import package: the wheel holds `longserve` alone (server/, patches/ and clients/ inside it), and
installed into a fresh virtual environment outside the checkout, `longserve --help` and
`python -m longserve --help` run from it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from longserve.server.engine.native import c_kernels

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built with this environment's setuptools (no download)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, capture_output=True, text=True, timeout=600)
    (built,) = out.glob("longserve-*.whl")
    return built


def test_the_wheel_holds_one_top_level_package_with_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops - {"longserve"} == {f"longserve-{wheel.name.split('-')[1]}.dist-info"}  # the package and its metadata
    expected = {f"longserve/{path.relative_to(REPO).as_posix()}"
                for folder in ("server", "patches", "clients") for path in (REPO / folder).rglob("*.py")}
    assert expected - set(names) == set()  # every module of the three folders, under longserve/
    assert "longserve/clients/data/haystack.txt" in names and "longserve/__main__.py" in names
    kernels = {f"longserve/server/engine/native/{path.name}" for path in [*c_kernels.SOURCES, *c_kernels.HEADERS]}
    assert kernels - set(names) == set()  # the C kernels' sources, built where the wheel is installed
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "longserve = longserve.server.cli:main" in entry_points
    assert "longserve.patches.vllm_plugin:register" in entry_points


def test_the_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    """A fresh venv, the wheel installed into it without its dependencies, which come from this environment's
    site-packages as a plain path (so this checkout's editable install is not on it)."""
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True, timeout=300)
    python = fresh / "bin" / "python"
    fresh_site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, text=True, timeout=600)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = {"capture_output": True, "text": True, "cwd": tmp_path, "env": env, "timeout": 600}
    where = subprocess.run([str(python), "-c", "import longserve.server.cli as cli; print(cli.__file__)"], **run)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(fresh_site / "longserve")  # the wheel's copy, not the checkout
    for command in ([str(fresh / "bin" / "longserve"), "--help"], [str(python), "-m", "longserve", "--help"]):
        shown = subprocess.run(command, **run)
        assert shown.returncode == 0, shown.stderr
        assert "serve" in shown.stdout and "usage" in shown.stdout.lower(), shown.stdout
    for old_name in ("server", "patches", "clients"):  # nothing installs under the old top-level names
        found = subprocess.run([str(python), "-c", f"import importlib.util; print(importlib.util.find_spec({old_name!r}))"],
                               **run)
        assert found.stdout.strip() == "None", (old_name, found.stdout)
