"""Nothing that ships or runs (code, Makefile, scripts, docs; everything outside tests/) may point
at a path outside the checkout: a user's machine has only the checkout (or the installed
package). The checker is tested on planted violations, so a checker that finds nothing fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
# Folders of the checkout that are not part of it: environments, caches, build outputs.
_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".mypy_cache",
              ".ruff_cache", ".pytest_cache", ".hypothesis", "bench-out"}
# A sibling "shared" folder next to the checkout: a development convenience, never the product's.
_SHARED = re.compile(r"(?<![\w.])(?:\.\./)+shared\b")
# Absolute paths into a home directory or a machine-specific root.
_ABSOLUTE = re.compile(r"(?<![\w.~$-])/(?:home|root|Users|work)/[\w.-]")
# Any relative path that climbs: checked against where it can be resolved from.
_CLIMB = re.compile(r"(?<![\w./~-])((?:\.\./)+[\w.-]*)")


def checked_files(root: Path) -> list[Path]:
    """The files of the checkout outside tests/: git's tracked and unignored ones when root is
    a git work tree, else every file under root less environments and caches."""
    names = _git_files(root)
    if names is None:
        names = [p.relative_to(root).as_posix() for p in _walk(root)]
    return [root / n for n in sorted(names) if not n.startswith("tests/")]


def _git_files(root: Path) -> list[str] | None:
    if not (root / ".git").exists() or shutil.which("git") is None:
        return None
    result = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, check=False,
    )
    if result.returncode != 0:
        return None
    return [n for n in result.stdout.decode().split("\0") if n and (root / n).is_file()]


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            yield Path(dirpath) / name


def _escapes(base: PurePosixPath, relative: str) -> bool:
    """True when ``relative``, resolved from ``base`` (a folder inside the checkout, as parts
    from its root), leaves the checkout."""
    depth = len(base.parts)
    for part in PurePosixPath(relative).parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            return True
    return False


def violations(root: Path) -> list[str]:
    """``file:line: text`` for each reference to a path outside the checkout."""
    found: list[str] = []
    for path in checked_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary files carry no paths we could follow
        folder = PurePosixPath(path.relative_to(root).parent.as_posix())
        for number, line in enumerate(text.splitlines(), start=1):
            if _line_escapes(line, folder):
                found.append(f"{path.relative_to(root).as_posix()}:{number}: {line.strip()}")
    return found


def _line_escapes(line: str, folder: PurePosixPath) -> bool:
    if _SHARED.search(line) or _ABSOLUTE.search(line):
        return True
    # A climbing path counts when it leaves the checkout both from the file's own folder
    # (compose files, includes) and from the root (where commands run).
    return any(
        _escapes(folder, m.group(1)) and _escapes(PurePosixPath(), m.group(1))
        for m in _CLIMB.finditer(line)
    )


def test_the_checkout_refers_to_nothing_outside_it() -> None:
    files = checked_files(ROOT)
    assert any(p.name == "Makefile" for p in files) and any(p.suffix == ".py" for p in files)
    assert violations(ROOT) == []


def _plant(root: Path) -> None:
    (root / "pkg").mkdir()
    (root / "docker").mkdir()
    (root / "tests").mkdir()
    (root / "pkg" / "ok.py").write_text('CACHE = "~/.cache/x"\nTMP = "/tmp/e"\n')
    (root / "pkg" / "trace.py").write_text('TRACE = "../shared/traces/t.csv"\n')
    (root / "pkg" / "home.py").write_text('DATA = "/home/someone/data.csv"\n')
    (root / "Makefile").write_text("demo:\n\tpython run.py --data ../../elsewhere/d.csv\n")
    (root / "docker" / "compose.yaml").write_text('volumes: ["../engines:/engines"]\n')
    (root / "tests" / "t.py").write_text('FIXTURE = "/home/someone/fixture"\n')  # tests may


def test_the_checker_catches_planted_violations_in_a_plain_tree(tmp_path: Path) -> None:
    _plant(tmp_path)
    found = violations(tmp_path)
    assert [line.split(":")[0] for line in found] == ["Makefile", "pkg/home.py", "pkg/trace.py"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_the_checker_reads_git_files_including_new_ones(tmp_path: Path) -> None:
    _plant(tmp_path)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "x.py").write_text('X = "../shared/x"\n')
    subprocess.run(["git", "-C", str(tmp_path), "add", "Makefile", "pkg"], check=True)
    # pkg/ and Makefile are tracked; docker/ is new (not yet added) and still checked;
    # ignored/ is not part of the checkout.
    (tmp_path / "docker" / "compose.yaml").write_text('volumes: ["../../x:/x"]\n')
    found = [line.split(":")[0] for line in violations(tmp_path)]
    assert found == ["Makefile", "docker/compose.yaml", "pkg/home.py", "pkg/trace.py"]
