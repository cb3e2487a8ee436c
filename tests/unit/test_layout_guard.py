"""Guards for the repository layout: `platform/` must never become a package."""
from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_platform_has_no_init() -> None:
    assert (ROOT / "platform" / "raymoe").is_dir()
    assert not (ROOT / "platform" / "__init__.py").exists(), (
        "platform/__init__.py shadows the stdlib `platform` module that torch and ray import; delete it"
    )


def test_torch_and_ray_import_with_repo_root_first_on_path() -> None:
    code = (
        "import sys; sys.path.insert(0, %r); import platform; "
        "assert hasattr(platform, 'system'), platform; import torch, ray; "
        "import raymoe; print(platform.system(), torch.__version__, ray.__version__)" % str(ROOT)
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Linux" in res.stdout or "Darwin" in res.stdout


def test_raymoe_subpackages_map_to_layout() -> None:
    import raymoe
    import raymoe.actors
    import raymoe.jobs

    assert pathlib.Path(raymoe.__file__).parent == ROOT / "platform" / "raymoe"
    assert pathlib.Path(raymoe.actors.__file__).parent == ROOT / "actors"
    assert pathlib.Path(raymoe.jobs.__file__).parent == ROOT / "jobs"
