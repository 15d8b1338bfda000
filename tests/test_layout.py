"""platform/ is a source folder: it must never shadow the standard-library module `platform`."""

import platform
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_standard_library_platform_module_wins_from_the_repo_root():
    out = subprocess.run(
        [sys.executable, "-c", "import platform, densetune; print(platform.system(), platform.__file__)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert out[0] == "Linux"
    assert Path(out[1]).parent == Path(sysconfig.get_paths()["stdlib"])


def test_under_pytest_too():
    assert Path(platform.__file__).parent == Path(sysconfig.get_paths()["stdlib"])
    assert not (ROOT / "platform" / "__init__.py").exists()
