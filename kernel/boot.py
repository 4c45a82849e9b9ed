"""djinnd: boot, serve, shut down.

Boot order, one line per subsystem:
  config -> logging -> uvloop event loop -> kernel (device worker, VMU, boot model)
  -> boot objects frozen out of the cyclic GC (the daemon's own process only)
  -> Unix socket (+ optional TCP) -> READY=1 to systemd -> serve until SIGTERM/SIGINT.
Shutdown: stop accepting; let in-flight work finish for shutdown_timeout_s, then
fail the rest with ESHUTDOWN; close connections; remove the socket; stop the worker.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any, Callable

from .config import Config, check_cpus, load_config

__all__ = ["main", "serve", "sd_notify"]

log = logging.getLogger("djinn")

SWITCH_INTERVAL_S = 0.0005  # GIL hand-off bound for the loop thread (CPython's default is 5 ms)


def sd_notify(message: str) -> bool:
    """Send `message` to $NOTIFY_SOCKET (systemd Type=notify). False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as e:
            log.warning("could not notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
            return False
    return True


async def serve(config: Config, *, on_ready: Callable[[Any], None] | None = None, install_signals: bool = True,
                freeze_boot_objects: bool = False) -> int:
    """Run the daemon until a signal (or `kernel.stop()`); returns the exit status.

    `on_ready(kernel)` is called once the socket listens (tests use it to reach the
    kernel); `install_signals=False` lets a test run the daemon in a thread.
    `freeze_boot_objects` (djinnd's own process): once the kernel has booted, collect,
    then move every object alive then out of the cyclic garbage collector's sight
    (`gc.freeze`). torch, transformers and the boot model are many objects (the
    boot test counts them) that live as long as the daemon; a full collection, which
    stops the event loop and the worker alike, then scans only what came after boot.
    """
    from .core import Kernel
    from .server import Connection, bind_unix_socket, parse_tcp

    loop = asyncio.get_running_loop()
    try:
        check_cpus(config)
    except ValueError as e:
        log.error("%s", e)
        return 2
    # The device worker runs Python between tensor ops; a short GIL switch interval
    # bounds how long the loop thread waits for the GIL to answer a control syscall.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    kernel = Kernel(config)  # starts the device worker, pinned to worker_cpus
    if config.loop_cpus is not None:  # this thread only: the worker keeps its own CPUs
        os.sched_setaffinity(0, config.loop_cpus)
    await kernel.start()
    if freeze_boot_objects:
        gc.collect()  # first, so that no garbage is frozen with them
        gc.freeze()
        log.debug("froze %d boot objects out of the cyclic GC", gc.get_freeze_count())
    path = config.socket_path
    try:
        sock = bind_unix_socket(path)
    except OSError as e:
        log.error("cannot listen on %s: %s", path, e.strerror or e)
        await kernel.shutdown()
        return 1
    path_ino = os.stat(path).st_ino
    servers = [await loop.create_unix_server(lambda: Connection(kernel, "unix"), sock=sock)]
    if config.tcp:
        host, port = parse_tcp(config.tcp)
        servers.append(await loop.create_server(lambda: Connection(kernel, "tcp"), host, port))
        log.info("listening on tcp %s:%d (token required)", host, port)
    stop = kernel.stop_event
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    log.info("djinnd %s ready on %s (device %s, model %s, policy %s)",
             kernel.version, path, kernel.device_name, config.model, config.policy)
    sd_notify("READY=1\nSTATUS=serving")
    if on_ready is not None:
        on_ready(kernel)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        sd_notify("STOPPING=1")
        for server in servers:
            server.close()
        await kernel.shutdown()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        try:
            if os.stat(path).st_ino == path_ino:
                os.unlink(path)
        except OSError:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        config = load_config(argv)
        check_cpus(config)  # serve() checks too, for callers that start it themselves
    except ValueError as e:
        print(f"djinnd: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvloop

    try:
        return uvloop.run(serve(config, freeze_boot_objects=True))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
