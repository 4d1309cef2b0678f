"""Products and their ideal rates (docs/oee.md "Products"). Pure: no I/O, no clock reads.

A product reading is kept as its *key*: the value written as text, the way the config writes
the keys of `ideal_cycle_times` (TOML keys are always text): 7 -> "7", "ABC" -> "ABC",
True -> "true". `edge-agent check` makes sure the keys match the product tag's type, so a
uint16 tag's 7 finds the key "7" and nothing else can.
"""

from __future__ import annotations

from agent.settings.machines import MachineConfig

NO_PRODUCT = "null"  # the key before the first good product reading (and of a null value)


def product_key(value: object) -> str:
    """A product reading as the text key of `ideal_cycle_times` and of a record's products."""
    if value is None:
        return NO_PRODUCT
    if value.__class__ is bool:
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        # An OPC UA double holding a whole number is the integer product code.
        return str(int(value))
    return str(value)


class IdealRates:
    """The ideal cycle time of each product, and the weight of a second of running time.

    Parts of a counter delta are spread in proportion to the parts the running time could
    have made at its product's ideal rate: seconds / ideal cycle time. Relative to the
    default product that is seconds x default / ideal, which is exactly the seconds for every
    product at the default rate (so a machine without a product table spreads by time alone,
    with no float noise).
    """

    __slots__ = ("_other", "default", "fastest", "table")

    def __init__(self, machine: MachineConfig) -> None:
        self.default = float(machine.ideal_cycle_time)
        self.table = {key: float(value) for key, value in machine.ideal_cycle_times.items()}
        self.fastest = min((self.default, *self.table.values()))
        # Products whose rate differs from the default (the others weigh their seconds).
        self._other = {key: value for key, value in self.table.items() if value != self.default}

    def ideal_cycle_time(self, product: str) -> float:
        """Ideal seconds per part of `product` (the default for a product the table lacks)."""
        return self.table.get(product, self.default)

    def weight(self, product: str, seconds: float) -> float:
        """`seconds` of running time of `product`, in seconds at the default ideal rate."""
        ideal = self._other.get(product)
        return seconds if ideal is None else seconds * self.default / ideal
