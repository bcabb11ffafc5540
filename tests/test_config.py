"""Config parsing: units, defaults, and errors an operator can act on."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from supervisor.settings.config import ConfigError, Host, load_config, model_config, parse_config
from supervisor.settings.units import parse_duration, parse_size

HOST = Host(memory_bytes=16 << 30, is_root=False, env={"HOME": "/home/op", "XDG_RUNTIME_DIR": "/run/user/1000"})


@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000), ("100", 100), (4096, 4096),
    ("50%", 8 << 30), ("0", 0),
])
def test_sizes(text, expected):
    assert parse_size(text, HOST.memory_bytes) == expected


@pytest.mark.parametrize("text, words", [("12 parsecs", "unknown size unit"), ("-1GiB", "negative"),
                                         ("150%", "above 100"), ("lots", "expected a size"), (True, "expected a size")])
def test_bad_sizes(text, words):
    with pytest.raises(ValueError, match=words):
        parse_size(text, HOST.memory_bytes)


@pytest.mark.parametrize("text, expected", [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), (2, 2.0), ("0", 0)])
def test_durations(text, expected):
    assert parse_duration(text) == expected


def test_keep_alive_minus_one_is_forever():
    assert parse_duration("-1", allow_forever=True) == math.inf
    with pytest.raises(ValueError, match="zero or more"):
        parse_duration("-1")


def test_models_inherit_defaults_and_override_them():
    config = parse_config("""
[supervisor]
state_dir = "state"
model_dirs = ["models", "/srv/models"]
[defaults]
n_ctx = 4096
flash_attn = true
[models.a]
path = "a.gguf"
[models.b]
path = "b.gguf"
n_ctx = 1024
keep_alive = "5m"
rlimit_data = "25%"
""", HOST, base_dir=Path("/etc/llm"))
    a, b = config.models
    assert (a.n_ctx, a.flash_attn, a.n_batch) == (4096, True, 512)
    assert (b.n_ctx, b.keep_alive, b.rlimit_data) == (1024, 300.0, 4 << 30)
    assert config.model_dirs == (Path("/etc/llm/models"), Path("/srv/models"))
    assert config.state_dir == Path("/etc/llm/state")
    assert config.address == "unix:///run/user/1000/llm-supervisor/supervisor.sock"


def test_small_context_gets_a_batch_that_fits():
    assert model_config("m", {"path": "m.gguf", "n_ctx": 128}, {}, HOST).n_batch == 128


@pytest.mark.parametrize("text, words", [
    ("[supervisor]\nbogus = 1", "unknown key(s) bogus"),
    ("[models.m]\npath = 'm.gguf'\nn_ctx = 'big'", "option n_ctx: expected a whole number"),
    ("[models.m]\nn_ctx = 512", "'path' is required"),
    ("[models.m]\npath = 'm.gguf'\nn_batch = 4096\nn_ctx = 1024", "n_batch must be between 1 and n_ctx"),
    ("[models.m]\npath = 'm.gguf'\ntype_v = 'q2'", "type_v must be one of"),
    ("[models.m]\npath = 'm.gguf'\nkeep_alive = 'soon'", "keep_alive"),
    ("[mystery]\nx = 1", "unknown config section"),
    ("[supervisor\n", "not valid TOML"),
    ("[logging]\nlevel = 'chatty'", "level must be"),
    ("[supervisor]\nstandby_workers = 20", "standby_workers must be between 0 (none) and 8"),
])
def test_config_errors_name_the_key(text, words):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, HOST)
    assert words in str(caught.value)


def test_embedded_default_serves_demo_from_the_state_directory():
    config = load_config(None, Host(1 << 30, True, {}))
    assert [m.name for m in config.models] == ["demo"]
    assert config.state_dir == Path("/var/lib/llm-supervisor")
    assert config.model_dirs == (Path("/var/lib/llm-supervisor/models"),)
    assert config.address == "unix:///run/llm-supervisor/supervisor.sock"
