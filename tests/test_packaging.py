"""What `pip install madakv-vllm` gives a user: the product package only, and a plugin that
registers without the repository's evaluation tooling."""

import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_wheel_carries_only_the_product_and_registers_on_its_own(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("madakv_vllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"madakv_vllm"}, top
    assert not any("proxy_tasks" in n or "milebench" in n or "tiny_models" in n for n in names), names

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    # -S: no site-packages .pth files, so the checkout's editable install cannot shadow the wheel;
    # vLLM and torch come from this venv's site-packages, madakv_vllm from the installed wheel.
    code = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(site)!r}, {sysconfig.get_paths()["purelib"]!r}]
        import importlib.metadata as md
        import madakv_vllm
        assert madakv_vllm.__file__.startswith({str(site)!r}), madakv_vllm.__file__
        eps = [e for e in md.entry_points(group="vllm.general_plugins") if e.name == "madakv"]
        assert eps and eps[0].value == "madakv_vllm:register", eps
        madakv_vllm.register()
        from vllm.v1.attention.backends.registry import AttentionBackendEnum
        assert "MADAKV" in AttentionBackendEnum.__members__
        assert not any(m == "madakv_eval" or m.startswith("madakv_eval.") for m in sys.modules)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
