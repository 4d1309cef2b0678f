"""``python -m simulators.modbus``: the Modbus simulator's command line (see cli.py)."""

import sys

from simulators.modbus.cli import main

sys.exit(main())
