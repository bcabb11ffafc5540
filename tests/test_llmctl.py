"""llmctl end to end: the real command against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def llmctl(daemon, *args, stdin: str = "", env_address: bool = False):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if env_address:
        env["LLM_SUPERVISOR_ADDRESS"] = daemon.address
    else:
        args = ("--address", daemon.address, *args)
    return subprocess.run([sys.executable, "-m", "supervisor.ctl.main", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


def test_generate_prints_the_text_and_json_ends_with_usage(shared_daemon):
    plain = llmctl(shared_daemon, "generate", "tiny", "hello", "--max-tokens", "12", "--seed", "5", "--temperature", "0.7")
    assert plain.returncode == 0, plain.stderr
    lines = llmctl(shared_daemon, "--json", "generate", "tiny", "hello", "--max-tokens", "12", "--seed", "5",
                   "--temperature", "0.7").stdout.splitlines()
    objects = [json.loads(line) for line in lines]
    assert "usage" in objects[-1] and all("usage" not in o for o in objects[:-1])
    assert objects[-1]["usage"]["completion_tokens"] == 12
    assert objects[-1]["finish_reason"] == "length"
    assert plain.stdout == "".join(o["text"] for o in objects) + "\n"


def test_status_and_models_tables_and_json(shared_daemon):
    table = llmctl(shared_daemon, "status", env_address=True)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:4] == ["MODEL", "STATE", "PID", "PRIVATE"]
    assert row.split()[:2] == ["tiny", "READY"]
    assert "CPU" in header.split() and "TEMP" in header.split()
    (status,) = [json.loads(line) for line in llmctl(shared_daemon, "--json", "status").stdout.splitlines()]
    assert status["model"] == "tiny" and int(status["private_memory_bytes"]) > 0
    models = llmctl(shared_daemon, "models").stdout
    assert "tiny" in models and "llama" in models


def test_chat_keeps_the_history(shared_daemon):
    result = llmctl(shared_daemon, "--json", "chat", "tiny", "--max-tokens", "4", "--system", "terse",
                    stdin="first question\nsecond question\n")
    assert result.returncode == 0, result.stderr
    finals = [o for o in map(json.loads, result.stdout.splitlines()) if "usage" in o]
    assert len(finals) == 2
    # The second turn's prompt holds the first question and answer too.
    assert finals[1]["usage"]["prompt_tokens"] > finals[0]["usage"]["prompt_tokens"] + 4


def test_errors_exit_non_zero_with_the_servers_message(shared_daemon, tmp_path):
    missing = llmctl(shared_daemon, "generate", "nope", "hi")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stderr and "unknown model 'nope'" in missing.stderr
    bad = llmctl(shared_daemon, "load", "x", "--path", "tiny.gguf", "--option", "n_ctx")
    assert bad.returncode == 2 and "KEY=VALUE" in bad.stderr
    nobody = subprocess.run([sys.executable, "-m", "supervisor.ctl.main", "--address", f"unix://{tmp_path}/none.sock",
                             "status"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert nobody.returncode == 1 and "cannot reach llm-supervisord" in nobody.stderr
