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


def test_no_references_to_docs_outside_the_repo() -> None:
    """The repository stands on its own: no file points at notes that live outside it (facts belong in docs/)."""
    import re

    # built from parts so that this file does not match itself
    banned = re.compile(r"(?<![\w-])(?:techniques|style|ecosystem|architecture)\.md\b|\.\./" + "shared")
    res = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    files = [f for f in res.stdout.split("\0") if f.endswith((".py", ".md", ".yaml", ".yml", ".toml"))]
    assert "README.md" in files
    hits = []
    for rel in files:
        path = ROOT / rel
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if banned.search(line):
                hits.append(f"{rel}:{n}: {line.strip()[:100]}")
    assert not hits, "references to documents outside the repository (inline the fact or point to docs/):\n" + \
        "\n".join(hits)


def test_pyproject_lists_every_package() -> None:
    """pyproject.toml lists packages by hand (automatic discovery cannot follow the platform/ mapping), so a new one
    must be added there, or a wheel silently lacks it and setuptools warns about unlisted folders that hold data."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import pytest

        tomllib = pytest.importorskip("tomli")
    st = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, roots = set(st["packages"]), st["package-dir"]
    on_disk = set()
    for name, rel in roots.items():
        root = ROOT / rel
        for d in [root, *root.rglob("*")]:
            if not d.is_dir() or "__pycache__" in d.parts or any(p.startswith(".") for p in d.relative_to(ROOT).parts):
                continue
            # code packages have an __init__.py; every folder of the Hydra config tree is a (data-only) package
            if (d / "__init__.py").exists() or (name == "raymoe.conf" and any(d.glob("*.yaml"))):
                on_disk.add(".".join((name, *d.relative_to(root).parts)))
    assert not on_disk - listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"remove from [tool.setuptools] packages in pyproject.toml: {sorted(listed - on_disk)}"
