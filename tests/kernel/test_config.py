"""Config precedence: defaults < TOML < DJINN_* < flags; bad values name the setting and its source."""

from __future__ import annotations

import pytest

from djinn.kernel.config import SETTINGS, build_parser, default_socket_path, load_config, parse_size


def test_defaults(tmp_path):
    cfg = load_config([], env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert cfg.model == "demo" and cfg.policy == "proactive" and cfg.config_file is None


def test_precedence_toml_env_flag(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('model = "dummy:gpt2"\npolicy = "reactive"\ngrace_s = 5\nmax_tokens = 64\n')
    env = {"DJINN_CONFIG": str(toml), "DJINN_POLICY": "none", "DJINN_GRACE_S": "7"}
    cfg = load_config(["--grace-s", "9"], env=env)
    assert cfg.model == "dummy:gpt2"  # from TOML
    assert cfg.policy == "none"  # env beats TOML
    assert cfg.grace_s == 9.0  # flag beats env
    assert cfg.max_tokens == 64
    assert cfg.config_file == str(toml)


def test_bad_value_names_setting_and_source(tmp_path):
    with pytest.raises(ValueError, match=r"policy from \$DJINN_POLICY"):
        load_config([], env={"DJINN_POLICY": "sometimes", "XDG_CONFIG_HOME": str(tmp_path)})
    with pytest.raises(ValueError, match="grace_s from --grace-s"):
        load_config(["--grace-s", "-1"], env={"XDG_CONFIG_HOME": str(tmp_path)})


def test_unknown_toml_key_is_an_error(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text("modle = 'demo'\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_config(["--config", str(toml)], env={})


def test_tcp_needs_token(tmp_path):
    with pytest.raises(ValueError, match="tcp_token"):
        load_config(["--tcp", "127.0.0.1:7000"], env={"XDG_CONFIG_HOME": str(tmp_path)})


def test_help_lists_every_setting():
    text = build_parser().format_help()
    for s in SETTINGS:
        assert "--" + s.name.replace("_", "-") in text
        assert f"DJINN_{s.name.upper()}" in text


@pytest.mark.parametrize("raw,expected", [("512MiB", 512 << 20), ("4GB", 4 << 30), (1024, 1024), ("0.5", 0.5),
                                          (0.25, 0.25), ("2048", 2048)])
def test_parse_size(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["lots", "-1", 1.5, "3 furlongs", True])
def test_parse_size_rejects(raw):
    with pytest.raises(ValueError):
        parse_size(raw)


def test_socket_env_override(monkeypatch):
    monkeypatch.setenv("DJINN_SOCKET", "/somewhere/else.sock")
    assert default_socket_path() == "/somewhere/else.sock"
    assert default_socket_path(for_client=True) == "/somewhere/else.sock"


def test_socket_under_systemd(monkeypatch):
    monkeypatch.delenv("DJINN_SOCKET", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/djinn")
    assert default_socket_path() == "/run/djinn/djinnd.sock"
