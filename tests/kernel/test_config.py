"""Config precedence: defaults < TOML < DJINN_* < flags; bad values name the setting and its source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from djinn.kernel.config import (SETTINGS, Config, build_parser, check_cpus, default_socket_path, load_config,
                                 parse_cpus, parse_size)
from tests.fakes import requires_affinity


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


def test_settings_may_sit_in_a_djinnd_table(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[djinnd]\npolicy = "reactive"\ngrace_s = 7\n')
    config = load_config(["--config", str(toml)], env={})
    assert config.policy == "reactive" and config.grace_s == 7


def test_the_config_file_is_found_where_help_says(tmp_path, monkeypatch):
    (tmp_path / "djinn").mkdir()
    (tmp_path / "djinn" / "djinnd.toml").write_text("grace_s = 3\n")
    assert load_config([], env={"XDG_CONFIG_HOME": str(tmp_path)}).grace_s == 3
    other = tmp_path / "other.toml"
    other.write_text("grace_s = 4\n")
    assert load_config([], env={"XDG_CONFIG_HOME": str(tmp_path), "DJINN_CONFIG": str(other)}).grace_s == 4
    assert "/etc/djinn/djinnd.toml" in " ".join(build_parser().format_help().split())


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


@pytest.mark.parametrize("raw,expected", [("3", (3,)), ("2,5", (2, 5)), ("4-7", (4, 5, 6, 7)), ("0-1,6", (0, 1, 6)),
                                          (" 5, 2,2 ", (2, 5)), ([1, 0], (0, 1)), (3, (3,)), ("", None),
                                          ("none", None), (None, None)])
def test_parse_cpus(raw, expected):
    assert parse_cpus(raw) == expected


@pytest.mark.parametrize("raw", ["a", "1-", "-2", "3-1", "1,,2", "1.5", "1;2", "0x1"])
def test_parse_cpus_rejects(raw):
    with pytest.raises(ValueError):
        parse_cpus(raw)


def test_cpu_settings_from_toml_env_and_flag(tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text("worker_cpus = [2, 3]\nloop_cpus = 1\n")
    cfg = load_config([], env={"DJINN_CONFIG": str(toml)})
    assert cfg.worker_cpus == (2, 3) and cfg.loop_cpus == (1,)
    cfg = load_config(["--loop-cpus", "0-1"], env={"DJINN_CONFIG": str(toml), "DJINN_WORKER_CPUS": "5"})
    assert cfg.worker_cpus == (5,) and cfg.loop_cpus == (0, 1)
    with pytest.raises(ValueError, match="worker_cpus from --worker-cpus"):
        load_config(["--worker-cpus", "two"], env={"XDG_CONFIG_HOME": str(tmp_path)})


@requires_affinity
def test_check_cpus_accepts_cpus_this_process_has_and_names_the_others():
    mine = tuple(sorted(os.sched_getaffinity(0)))
    check_cpus(Config(worker_cpus=mine[:1], loop_cpus=mine))
    check_cpus(Config())
    with pytest.raises(ValueError, match=r"loop_cpus: CPU\(s\) 4096 are not available"):
        check_cpus(Config(loop_cpus=(4096,)))


def test_socket_env_override(monkeypatch):
    monkeypatch.setenv("DJINN_SOCKET", "/somewhere/else.sock")
    assert default_socket_path() == "/somewhere/else.sock"
    assert default_socket_path(for_client=True) == "/somewhere/else.sock"


def test_socket_under_systemd(monkeypatch):
    monkeypatch.delenv("DJINN_SOCKET", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/djinn")
    assert default_socket_path() == "/run/djinn/djinnd.sock"


def test_help_shows_off_and_none_for_tcp_and_its_token():
    text = " ".join(build_parser().format_help().split())
    assert "[env DJINN_TCP; default off]" in text
    assert "[env DJINN_TCP_TOKEN; default none]" in text
    assert ":PORT binds 127.0.0.1" in text
    assert "default: see" not in text  # the socket rule is written out
    assert "djinn-<uid>/djinnd.sock in the system's root temporary" in text


SYSTEM_SOCKET = "/run/djinn/djinnd.sock"


@pytest.fixture
def as_user(monkeypatch, tmp_path):
    """A non-root caller with no DJINN_SOCKET, under systemd-like RUNTIME_DIRECTORY; returns
    `system(exists)`, which decides whether /run/djinn/djinnd.sock is there."""
    import os

    monkeypatch.delenv("DJINN_SOCKET", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "unit"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    real_exists = os.path.exists
    system_exists = [False]
    monkeypatch.setattr(os.path, "exists", lambda p: system_exists[0] if p == SYSTEM_SOCKET else real_exists(p))

    def system(exists: bool) -> None:
        system_exists[0] = exists

    return system


def test_client_socket_is_the_per_user_one_when_there_is_no_system_socket(as_user, tmp_path):
    as_user(False)
    user = str(tmp_path / "xdg" / "djinn" / "djinnd.sock")
    assert default_socket_path() == str(tmp_path / "unit" / "djinnd.sock")  # the daemon follows systemd
    assert default_socket_path(for_client=True) == user  # a client ignores RUNTIME_DIRECTORY


def test_client_falls_back_to_the_system_socket_when_the_user_one_is_missing(as_user, tmp_path):
    as_user(True)
    assert default_socket_path(for_client=True) == SYSTEM_SOCKET
    user = tmp_path / "xdg" / "djinn" / "djinnd.sock"
    user.parent.mkdir(parents=True)
    user.touch()
    assert default_socket_path(for_client=True) == str(user)  # a per-user daemon's socket wins


def test_client_socket_without_xdg_runtime_dir(as_user, monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the fallback is fixed: a caller's TMPDIR never moves it
    as_user(False)
    path = Path(default_socket_path(for_client=True))
    assert (path.name, path.parent.name) == ("djinnd.sock", "djinn-1000")  # the uid as_user pretends to be
    assert path.is_absolute() and not path.is_relative_to(tmp_path)
    as_user(True)
    assert default_socket_path(for_client=True) == SYSTEM_SOCKET


def test_root_client_uses_the_system_socket(as_user, monkeypatch):
    import os

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path(for_client=True) == SYSTEM_SOCKET
    monkeypatch.setenv("DJINN_SOCKET", "/elsewhere.sock")
    assert default_socket_path(for_client=True) == "/elsewhere.sock"
