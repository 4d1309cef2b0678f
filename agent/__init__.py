"""edge-agent: the line gateway daemon (settings, runtime, OEE, workflows, health, CLI)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edge-agent")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
