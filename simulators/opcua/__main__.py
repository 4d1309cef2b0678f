"""``python -m simulators.opcua``: the OPC UA line simulator (``edge-agent simulate opcua``)."""

import logging
import sys

from simulators.opcua.cli import main

if __name__ == "__main__":
    # asyncua logs every refused login and dropped connection at WARNING and above; the CLI
    # (`edge-agent simulate opcua`) does the same unless --log-level debug.
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    sys.exit(main())
