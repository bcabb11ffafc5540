"""deploy/install-service.sh run from a checkout the service account cannot read, as people clone under
/root or /home: what the unit points at must be there, and readable and runnable by an unprivileged user.

The real script runs with --code-only (everything but systemd, which is not PID 1 here) into a temporary
prefix and builds its own .venv there: ~20 s once deploy/setup.sh has built llama.cpp for the system's
python3. Where the checkout's .venv runs another Python (pyenv here), the first run builds llama.cpp for
the system's (~10 minutes on 2 busy cores), as the first real install would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_systemd_files import UNIT, directives

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="installs as root and checks as another user"),
    pytest.mark.skipif(not (shutil.which("git") and shutil.which("runuser")), reason="needs git and runuser"),
]
UNIT_PREFIX = "/opt/llm-supervisor"
# Where the unit cannot see: ProtectHome=yes hides these, PrivateTmp=yes replaces these.
HIDDEN_FROM_THE_UNIT = ("/root", "/home", "/run/user", "/tmp", "/var/tmp")
BARE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
INSTALL_TIMEOUT_S = 1200  # a cold llama.cpp build included


def run_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", "nobody", "--", *argv], capture_output=True, text=True, cwd="/",
                          env=BARE_ENV, timeout=60)


def install(checkout: Path, prefix: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["bash", str(checkout / "deploy/install-service.sh"), "--code-only"],
                            capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                            env=dict(os.environ, LLM_SUPERVISOR_PREFIX=str(prefix)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def exec_start(prefix: str) -> Path:
    """The unit's daemon, as install-service.sh writes the unit for this prefix."""
    rendered = UNIT.read_text().replace(UNIT_PREFIX, prefix)
    return Path(directives(rendered)["ExecStart"][0].split()[0])


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clone of this working tree in a directory closed to others (like /root), owned by its user."""
    home = tmp_path_factory.mktemp("home")
    home.chmod(0o700)
    clone = home / "llm-supervisor"
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)
    subprocess.run(["git", "add", "-A"], cwd=clone, check=True)
    # Someone else's files: what root meets running the script with sudo from a user's clone.
    shutil.chown(clone, "nobody")
    for path in clone.rglob("*"):
        os.lchown(path, 65534, 65534)
    return clone


@pytest.fixture(scope="module")
def prefix(checkout: Path) -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="llm-supervisor-install-"))
    base.chmod(0o755)  # mkdtemp's 0700 would hide the prefix the way /root does
    installed = base / "opt/llm-supervisor"
    try:
        install(checkout, installed)
        yield installed
    finally:
        shutil.rmtree(base)


def test_the_units_own_prefix_is_one_the_service_can_see():
    daemon = str(exec_start(UNIT_PREFIX))
    assert daemon == f"{UNIT_PREFIX}/.venv/bin/llm-supervisord"
    assert not daemon.startswith(tuple(f"{hidden}/" for hidden in HIDDEN_FROM_THE_UNIT))


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_an_unprivileged_user_runs_the_daemon_the_unit_names(prefix: Path, checkout: Path):
    daemon = exec_start(str(prefix))
    assert daemon.is_file() and os.access(daemon, os.X_OK)
    # A venv runs its base interpreter in place (a pyenv one under /root or /home is out of reach).
    interpreter = str((prefix / ".venv/bin/python").resolve())
    assert not interpreter.startswith(tuple(f"{hidden}/" for hidden in HIDDEN_FROM_THE_UNIT)), interpreter
    # The unreadable checkout is out of reach, so all of this comes from the prefix.
    assert run_as_nobody("test", "-r", str(checkout / "README.md")).returncode != 0
    help_text = run_as_nobody(str(daemon), "--help")
    assert help_text.returncode == 0 and "--config" in help_text.stdout, help_text.stderr
    imported = run_as_nobody(str(prefix / ".venv/bin/python"), "-c",
                             "import supervisor, worker.main, llama_cpp; print(supervisor.__file__)")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == str(prefix / "supervisor/__init__.py")


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_everything_installed_is_roots_and_readable_by_all(prefix: Path):
    assert not (prefix / ".venv").is_symlink() and (prefix / ".venv/pyvenv.cfg").is_file()
    assert (prefix / "supervisor/__pycache__").is_dir()  # compiled by root: the service cannot write there
    problems = []
    for path in [prefix, *prefix.rglob("*")]:
        st = path.lstat()
        if path.is_symlink():
            continue
        readable = 0o005 if path.is_dir() else 0o004
        if st.st_uid != 0 or st.st_mode & 0o022 or st.st_mode & readable != readable:
            problems.append(f"{path} uid={st.st_uid} mode={st.st_mode & 0o7777:o}")
    assert problems == []


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_the_unit_as_installed_passes_systemd_analyze_verify(prefix: Path, tmp_path: Path):
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd tools not installed")
    unit = tmp_path / "llm-supervisor.service"
    unit.write_text(UNIT.read_text().replace(UNIT_PREFIX, str(prefix)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr  # warnings count too


def test_a_prefix_the_service_cannot_see_is_refused_before_anything_is_done():
    # As nobody: were the check missing, the script would stop at "run as root", touching nothing.
    for hidden, reason in (("/home/alice/llm-supervisor", "ProtectHome"), ("/tmp/llm-supervisor", "PrivateTmp")):
        result = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(ROOT / "deploy/install-service.sh")],
                                capture_output=True, text=True, cwd="/", timeout=60,
                                env=dict(BARE_ENV, LLM_SUPERVISOR_PREFIX=hidden))
        assert result.returncode == 1 and f"{hidden} is hidden from the service ({reason}" in result.stderr, result.stderr


@pytest.mark.timeout(INSTALL_TIMEOUT_S)
def test_running_it_again_upgrades_the_copy_and_keeps_its_venv(prefix: Path, checkout: Path):
    venv_created = (prefix / ".venv/pyvenv.cfg").stat().st_mtime_ns
    (checkout / "docs/decisions.md").unlink()  # gone upstream
    (checkout / "supervisor/added_upstream.py").write_text("VALUE = 1\n")  # new upstream
    (checkout / "stray.gguf").write_bytes(b"GGUF")  # not tracked: stays in the checkout
    subprocess.run(["git", "-c", f"safe.directory={checkout}", "add", "supervisor/added_upstream.py"], cwd=checkout, check=True)
    install(checkout, prefix)
    assert not (prefix / "docs/decisions.md").exists()
    assert (prefix / "supervisor/added_upstream.py").read_text() == "VALUE = 1\n"
    assert not (prefix / "stray.gguf").exists()
    assert (prefix / ".venv/pyvenv.cfg").stat().st_mtime_ns == venv_created  # not rebuilt
    imported = run_as_nobody(str(prefix / ".venv/bin/python"), "-c", "import supervisor.added_upstream")
    assert imported.returncode == 0, imported.stderr
