"""The systemd unit, sysusers.d and tmpfiles.d files, checked by systemd's own tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from supervisor.settings.config import Host, parse_config
from tests.conftest import ROOT

UNIT = ROOT / "systemd" / "llm-supervisor.service"
needs_systemd_tools = pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd tools not installed")


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


# The unit as installed, pointing at a real install, passes `systemd-analyze verify`: tests/test_install_service.py.


@needs_systemd_tools
def test_verify_would_catch_a_broken_unit(tmp_path):
    # Any existing ExecStart will do here (verify also checks that it exists): only the typo is under test.
    unit = tmp_path / "llm-supervisor.service"
    unit.write_text(UNIT.read_text().replace("/opt/llm-supervisor", str(ROOT)).replace("Type=notify", "Tpye=notify"))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert "Unknown key 'Tpye'" in result.stderr


def test_the_unit_says_what_the_operator_relies_on():
    d = directives(UNIT.read_text())
    expected = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "User": "llm-supervisor",
                "RuntimeDirectory": "llm-supervisor", "StateDirectory": "llm-supervisor",
                "ConfigurationDirectory": "llm-supervisor", "Delegate": "yes", "NoNewPrivileges": "yes",
                "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "KillMode": "mixed",
                "ExecReload": "/bin/kill -HUP $MAINPID"}
    assert {k: d.get(k, [None])[0] for k in expected} == expected
    assert d["WatchdogSec"] and d["MemoryHigh"] and d["MemoryMax"]
    assert "/dev/nvidiactl rw" in d["DeviceAllow"] and "char-nvidia-frontend rw" in d["DeviceAllow"]


@needs_systemd_tools
def test_sysusers_and_tmpfiles_create_the_account_and_directories(tmp_path):
    (tmp_path / "etc").mkdir()
    sysusers = subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(ROOT / "systemd/llm-supervisor.sysusers.conf")],
                              capture_output=True, text=True)
    assert sysusers.returncode == 0, sysusers.stderr
    passwd = (tmp_path / "etc/passwd").read_text()
    assert "llm-supervisor:x:" in passwd and ":/usr/sbin/nologin" in passwd
    assert "llm-supervisor" in next(line for line in (tmp_path / "etc/group").read_text().splitlines()
                                    if line.startswith("video:"))
    tmpfiles = subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create",
                               str(ROOT / "systemd/llm-supervisor.tmpfiles.conf")], capture_output=True, text=True)
    assert tmpfiles.returncode == 0, tmpfiles.stderr
    assert (tmp_path / "var/lib/llm-supervisor/models").is_dir() and (tmp_path / "etc/llm-supervisor").is_dir()


def test_the_example_config_parses_with_systemds_directories():
    host = Host(memory_bytes=64 << 30, is_root=True,
                env={"STATE_DIRECTORY": "/var/lib/llm-supervisor", "RUNTIME_DIRECTORY": "/run/llm-supervisor"})
    config = parse_config((ROOT / "deploy/config.example.toml").read_text(), host)
    assert config.address == "unix:///run/llm-supervisor/supervisor.sock" and config.journald
    assert config.model_dirs == (Path("/var/lib/llm-supervisor/models"),)
