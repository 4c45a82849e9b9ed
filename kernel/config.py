"""djinnd's configuration: one table of settings, read from TOML, then DJINN_* variables, then flags.

Rules: every setting is a row in SETTINGS (name, type, default, help). Precedence,
lowest to highest: built-in default < TOML file < environment variable
`DJINN_<NAME>` < command-line flag `--<name>`. The TOML file is `--config PATH`,
else `$DJINN_CONFIG`, else the first of `$XDG_CONFIG_HOME/djinn/djinnd.toml`
(or `~/.config/djinn/djinnd.toml`) and `/etc/djinn/djinnd.toml` that exists.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from djinn.drivers import units
from djinn.drivers.errors import BadArgument

__all__ = ["Config", "Setting", "SETTINGS", "default_socket_path", "shared_tmp_socket_path", "client_socket_path",
           "check_socket_dir", "load_config", "build_parser", "check_cpus", "parse_cpus", "parse_size"]


def default_socket_path(*, for_client: bool = False) -> str:
    """Where djinnd listens, and where clients look, when nothing says otherwise.

    `$DJINN_SOCKET` wins. Under systemd with `RuntimeDirectory=djinn` the unit's
    `$RUNTIME_DIRECTORY` is used. root gets `/run/djinn/djinnd.sock`; anyone else
    `$XDG_RUNTIME_DIR/djinn/djinnd.sock`, or `/tmp/djinn-<uid>/djinnd.sock` when
    XDG_RUNTIME_DIR is unset. A client that finds no per-user socket falls back
    to the system one at `/run/djinn/djinnd.sock`.
    """
    env = os.environ.get("DJINN_SOCKET")
    if env:
        return env
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY")
    if runtime_dir and not for_client:
        return os.path.join(runtime_dir.split(":")[0], "djinnd.sock")
    system = "/run/djinn/djinnd.sock"
    if os.geteuid() == 0:
        return system
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    user = os.path.join(xdg, "djinn", "djinnd.sock") if xdg else shared_tmp_socket_path()
    if for_client and not os.path.exists(user) and os.path.exists(system):
        return system
    return user


def shared_tmp_socket_path() -> str:
    """The per-user socket under /tmp, the default when XDG_RUNTIME_DIR is unset. /tmp is shared: another
    user may have made its directory first, which `check_socket_dir` finds out."""
    return os.path.join("/tmp", f"djinn-{os.geteuid()}", "djinnd.sock")  # built as the XDG one is


def client_socket_path(path: str | None = None) -> str:
    """Where a client connects: `path`, else `default_socket_path(for_client=True)`. A socket in the shared
    /tmp directory is used only once `check_socket_dir` finds that directory this user's (or root's)."""
    target = path or default_socket_path(for_client=True)
    if target == shared_tmp_socket_path() and os.path.isdir(os.path.dirname(target)):
        check_socket_dir(os.path.dirname(target))
    return target


def check_socket_dir(parent: str) -> None:
    """Raise PermissionError for a socket directory that someone else controls: one owned by another user
    than this one or root (say the per-user directory under /tmp, made first by another user, or a link
    to their directory), or one that anyone may write to without the sticky bit. Either would let that
    user put their own socket in place of djinnd's, and a client would hand its sessions to whoever listens."""
    st = os.stat(parent)  # through links: what counts is the directory the socket is in
    if st.st_uid not in (os.geteuid(), 0):
        raise PermissionError(errno.EPERM, f"{parent} belongs to uid {st.st_uid}, not to this user "
                                           f"({os.geteuid()}) or root; refusing to use a socket in it")
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise PermissionError(errno.EPERM, f"{parent} is writable by anyone (mode {oct(st.st_mode & 0o7777)}) "
                                           "without the sticky bit; refusing to use a socket in it")


def parse_size(value: str | int | float) -> int | float:
    """A size setting: an int of bytes, "512MiB"/"4GB" (binary units), or a fraction ("0.5", "50%").

    Fractions are returned as floats and resolved later against the memory free at
    boot. The parser is the VMU's (`djinn.drivers.units`). Raises ValueError with the
    accepted forms on anything else.
    """
    try:
        return units.parse_size(value)
    except BadArgument as e:
        raise ValueError(str(e)) from None


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (true/false), got {value!r}")


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value)
    return text or None


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return text

    parse.__name__ = "|".join(options)
    return parse


def _nonneg_float(value: Any) -> float:
    f = float(value)
    if f < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return f


def parse_cpus(value: Any) -> tuple[int, ...] | None:
    """A CPU list as taskset and cgroups write it: "3", "2,5", "4-7", "0-1,6"; empty or "none": unset.
    Returns the CPUs sorted, without repeats. Raises ValueError on anything else."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    text = str(value).strip().lower()
    if text in ("", "none"):
        return None
    cpus: set[int] = set()
    for item in text.split(","):
        lo, sep, hi = item.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"expected a CPU list such as 3, 2,5 or 4-7, got {value!r}")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"CPU range {item.strip()!r} runs backwards")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def check_cpus(config: Config) -> None:
    """Raises ValueError when worker_cpus or loop_cpus names a CPU this process may not run on, or when
    the platform cannot pin threads (only Linux can)."""
    for name in ("worker_cpus", "loop_cpus"):
        cpus = getattr(config, name)
        if cpus is None:
            continue
        if not hasattr(os, "sched_setaffinity"):
            raise ValueError(f"setting {name}: pinning threads to CPUs needs Linux (sched_setaffinity)")
        allowed = os.sched_getaffinity(0)
        missing = sorted(set(cpus) - allowed)
        if missing:
            raise ValueError(f"setting {name}: CPU(s) {', '.join(map(str, missing))} are not available to djinnd "
                             f"(it may run on {', '.join(map(str, sorted(allowed)))})")


def _pos_int(value: Any) -> int:
    i = int(value)
    if i <= 0:
        raise ValueError(f"expected an integer > 0, got {value!r}")
    return i


@dataclass(frozen=True, slots=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    shown_default: str | None = None  # what --help says the default is, where `default` would mislead


SETTINGS: tuple[Setting, ...] = (
    Setting("socket", _opt_str, None, "Unix socket path. Unset: $RUNTIME_DIRECTORY/djinnd.sock when systemd sets "
            "RUNTIME_DIRECTORY (its first entry if several); else /run/djinn/djinnd.sock for root; else "
            "$XDG_RUNTIME_DIR/djinn/djinnd.sock, or djinn-<uid>/djinnd.sock in the system's root temporary "
            "directory (not $TMPDIR) when XDG_RUNTIME_DIR is unset. "
            "Clients use $DJINN_SOCKET, else the same rule without the RUNTIME_DIRECTORY step, and a non-root "
            "client whose per-user socket does not exist uses /run/djinn/djinnd.sock when that one exists",
            "auto (see above)"),
    Setting("tcp", _opt_str, None, "also listen on TCP: HOST:PORT binds HOST as given (0.0.0.0: every interface), "
            ":PORT binds 127.0.0.1 (loopback, recommended); requires tcp_token. Off unless set", "off"),
    Setting("tcp_token", _opt_str, None, "shared secret TCP clients send in hello; sessions they open belong to tcp_token_uid",
            "none"),
    Setting("tcp_token_uid", int, os.geteuid(), "uid that owns sessions opened over TCP with the token",
            "the daemon's uid"),
    Setting("model", str, "demo", "model to load at boot: demo, dummy:gpt2, dummy:llama-1b, dummy:llama-8b, a local HF directory, "
            "or none (load models later with load_model)"),
    Setting("device", str, "auto", "auto, cpu, cuda or cuda:N"),
    Setting("dtype", _opt_str, None, "model dtype (float32, bfloat16, float16); default fp32 on CPU, the checkpoint's half precision on CUDA"),
    Setting("policy", _choice("proactive", "reactive", "none"), "proactive", "memory policy"),
    Setting("proactive_mode", _choice("eager", "lazy"), "eager", "proactive IO_WAIT: page out at once (eager) or only when memory is wanted (lazy)"),
    Setting("idle_timeout_s", _nonneg_float, 5.0, "reactive policy: a session idle this long may be paged out under pressure"),
    Setting("prefetch_margin_ms", _nonneg_float, 2.0, "proactive policy: start a prefetch this much earlier than the estimate says"),
    Setting("memory_wait_ms", _nonneg_float, 0.0, "a syscall that finds no room, and no session the policy may page out, "
            "waits this long for memory to be freed before it fails with ENOMEM (0: fail at once)"),
    Setting("grace_s", _nonneg_float, 30.0, "seconds a disconnected client's sessions live before they are reclaimed (0: at once)"),
    Setting("max_tokens", _pos_int, 1024, "default context length of a new session"),
    Setting("vmu_text", parse_size, 0.5, "Text segment size (weights): bytes, e.g. 4GiB, or a fraction of free device memory"),
    Setting("vmu_data", parse_size, 0.3, "Data segment size (session arenas): bytes or a fraction of free device memory"),
    Setting("vmu_stack", parse_size, 0.1, "Stack budget (per-request activations): bytes or a fraction of free device memory"),
    Setting("vmu_host", parse_size, 0.25, "host pool size (paged-out arenas, checkpoints): bytes or a fraction of host RAM"),
    Setting("vmu_session_arena_mb", _pos_int, 64, "default arena size of a session with no model, in MiB"),
    Setting("decode_batch", _pos_int, 32, "most sessions of one model whose generate steps run as one batched "
            "decode pass when they arrive together; 1: every step runs alone"),
    Setting("cuda_streams", _pos_int, 4, "CUDA compute streams the sessions are spread over (each session's work on one)"),
    Setting("cpu_threads", int, 0, "torch CPU threads for model work; 0: all cores but one, which the event loop "
            "keeps, or with worker_cpus one per worker CPU"),
    Setting("worker_cpus", parse_cpus, None, "CPUs the device worker thread may run on (Linux), e.g. 3 or 4-7; "
            "threads it starts (torch's CPU pool) inherit them. Unset: any CPU", "any"),
    Setting("loop_cpus", parse_cpus, None, "CPUs the event loop thread may run on (Linux), e.g. 2. Unset: any CPU",
            "any"),
    Setting("shutdown_timeout_s", _nonneg_float, 10.0, "on SIGTERM, how long in-flight requests may finish before they fail with ESHUTDOWN"),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "logging level"),
)


@dataclass(slots=True)
class Config:
    socket: str | None = None
    tcp: str | None = None
    tcp_token: str | None = None
    tcp_token_uid: int = field(default_factory=os.geteuid)
    model: str = "demo"
    device: str = "auto"
    dtype: str | None = None
    policy: str = "proactive"
    proactive_mode: str = "eager"
    idle_timeout_s: float = 5.0
    prefetch_margin_ms: float = 2.0
    memory_wait_ms: float = 0.0
    grace_s: float = 30.0
    max_tokens: int = 1024
    vmu_text: int | float = 0.5
    vmu_data: int | float = 0.3
    vmu_stack: int | float = 0.1
    vmu_host: int | float = 0.25
    vmu_session_arena_mb: int = 64
    decode_batch: int = 32
    cuda_streams: int = 4
    cpu_threads: int = 0
    worker_cpus: tuple[int, ...] | None = None
    loop_cpus: tuple[int, ...] | None = None
    shutdown_timeout_s: float = 10.0
    log_level: str = "info"
    config_file: str | None = None

    @property
    def socket_path(self) -> str:
        return self.socket or default_socket_path()

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out.get("tcp_token"):
            out["tcp_token"] = "***"
        return out


assert {s.name for s in SETTINGS} | {"config_file"} == {f.name for f in fields(Config)}, "SETTINGS and Config disagree"


def _config_file(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("DJINN_CONFIG"):
        return Path(env["DJINN_CONFIG"])
    xdg = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for candidate in (Path(xdg) / "djinn" / "djinnd.toml", Path("/etc/djinn/djinnd.toml")):
        if candidate.is_file():
            return candidate
    return None


def build_parser() -> argparse.ArgumentParser:
    """The `djinnd` argument parser; --help lists every setting with its variable and default."""
    p = argparse.ArgumentParser(
        prog="djinnd",
        description="Djinn tensor operating system daemon.",
        epilog="Precedence: defaults < TOML file < DJINN_* environment < flags. "
        "TOML keys are the setting names above with '_' (e.g. idle_timeout_s = 2.0), at the top level "
        "of the file or in a [djinnd] table.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PATH",
                   help="TOML config file [env DJINN_CONFIG; default the first that exists of "
                        "$XDG_CONFIG_HOME/djinn/djinnd.toml (~/.config/djinn/djinnd.toml) and /etc/djinn/djinnd.toml]")
    for s in SETTINGS:
        flag = "--" + s.name.replace("_", "-")
        default = s.shown_default or ("auto" if s.default is None else s.default)
        p.add_argument(flag, dest=s.name, default=None, metavar=s.name.upper(),
                       help=f"{s.help} [env DJINN_{s.name.upper()}; default {default}]")
    return p


def load_config(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Resolve the configuration. Raises ValueError naming the setting and its source on a bad value."""
    env = os.environ if env is None else env
    ns = build_parser().parse_args(argv)
    values: dict[str, Any] = {}
    path = _config_file(ns.config, env)
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"config file {path}: {e}") from e
        section = data.get("djinnd", data)
        known = {s.name for s in SETTINGS}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"config file {path}: unknown settings {unknown}; see djinnd --help")
        values.update({k: (v, f"{path}") for k, v in section.items()})
    for s in SETTINGS:
        key = f"DJINN_{s.name.upper()}"
        if key in env:
            values[s.name] = (env[key], f"${key}")
        flag = getattr(ns, s.name)
        if flag is not None:
            values[s.name] = (flag, "--" + s.name.replace("_", "-"))
    cfg = Config(config_file=str(path) if path else None)
    by_name = {s.name: s for s in SETTINGS}
    for name, (raw, source) in values.items():
        try:
            setattr(cfg, name, by_name[name].parse(raw))
        except (TypeError, ValueError) as e:
            raise ValueError(f"setting {name} from {source}: {e}") from e
    if cfg.tcp and not cfg.tcp_token:
        raise ValueError("setting tcp needs tcp_token: TCP clients must authenticate (DJINN_TCP_TOKEN)")
    return cfg
