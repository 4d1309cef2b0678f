"""The demo's embedded MQTT broker, for a machine without mosquitto: amqtt (MQTT 3.1.1, from the
demo extra) in the demo's own process on a free loopback port, anonymous, retained messages and
sessions in memory only, its log in the demo's temporary directory.

In the demo's process rather than a child process: it starts in milliseconds, it cannot outlive
the demo (not even a kill -9 of it), and it needs no interpreter another account can run (as
root, mosquitto runs as `nobody`, who cannot enter a venv under /root). Its log goes to a file
because amqtt logs ordinary client behaviour (a connection closed before its CONNECT) as errors
with a traceback, which would otherwise land on the demo's screen.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final

from agent.demo.servers import LOOPBACK, ServerUnavailable, free_port

if TYPE_CHECKING:
    from amqtt.broker import Broker

log = logging.getLogger("edge_agent.demo")

PROTOCOL: Final = "3.1.1"  # all amqtt speaks; told so, the clients skip a 10 s MQTT 5 attempt
BIND_ATTEMPTS = 20  # free ports tried when another process takes the chosen one first
STOP_TIMEOUT = 10.0  # seconds for amqtt's shutdown
# amqtt logs through its own loggers and, for its state machines, through transitions'.
_LOGGERS = {"amqtt": logging.INFO, "transitions": logging.WARNING}


def amqtt_config(port: int) -> dict[str, object]:
    """The broker's whole config: one TCP listener on 127.0.0.1:PORT, anonymous clients, and no
    other plugin ($SYS topics, packet logging and persistence would each be one)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{LOOPBACK}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class EmbeddedAmqtt:
    """amqtt on 127.0.0.1:PORT in this process; ServerUnavailable from start() when amqtt is
    not installed or cannot listen."""

    what = "amqtt"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_path = workdir / "amqtt.log"
        self.port = 0
        self.version = ""
        self._broker: Broker | None = None
        self._handler: logging.Handler | None = None
        self._saved: dict[str, tuple[int, bool]] = {}

    @property
    def url(self) -> str:
        """mqtt://127.0.0.1:PORT (once started)."""
        return f"mqtt://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker listens."""
        return self._broker is not None

    async def start(self) -> None:
        """Listen on a free loopback port."""
        try:
            import amqtt
            from amqtt.broker import Broker
            from amqtt.errors import BrokerError
        except ImportError as exc:
            raise ServerUnavailable(f"amqtt is not installed ({exc})") from None
        self.version = str(amqtt.__version__)
        await asyncio.to_thread(self._log_to_file)
        for _ in range(BIND_ATTEMPTS):
            port = free_port()
            broker = Broker(amqtt_config(port))
            try:
                await broker.start()
            except BrokerError as exc:
                cause = exc.__cause__
                if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
                    continue  # lost the race for the port: another one
                self._restore_logging()
                raise ServerUnavailable(f"amqtt did not start: {exc}") from None
            self._broker, self.port = broker, port
            return
        self._restore_logging()
        raise ServerUnavailable(f"amqtt found no free port in {BIND_ATTEMPTS} attempts")

    async def stop(self) -> None:
        """Close the listener and every connection; the log file is closed."""
        broker, self._broker = self._broker, None
        try:
            if broker is not None:
                await asyncio.wait_for(broker.shutdown(), STOP_TIMEOUT)
        except Exception as exc:  # its defects must not cost the demo its last screen
            log.warning("demo: amqtt did not stop cleanly: %s", exc)
        finally:
            self._restore_logging()

    def _log_to_file(self) -> None:
        self.workdir.mkdir(mode=0o700, exist_ok=True)
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        for name, level in _LOGGERS.items():
            logger = logging.getLogger(name)
            self._saved[name] = (logger.level, logger.propagate)
            logger.addHandler(handler)
            logger.setLevel(level)
            logger.propagate = False
        self._handler = handler

    def _restore_logging(self) -> None:
        handler, self._handler = self._handler, None
        if handler is None:
            return
        for name, (level, propagate) in self._saved.items():
            logger = logging.getLogger(name)
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
        self._saved.clear()
        handler.close()
