"""What ``backend="auto"`` picks on a device that was measured: per targeting kind, the backend
(and, for weight targeting, its selection variant) that was fastest in the op benchmark there.

Written by ``td-kernels tune bench/results/<card>/bench.csv --write`` from the op benchmark's
fwd+bwd rows (``td_kernels.tools.bench.tune`` says how it scores); not edited by hand. Keyed by
the device's name as ``td_kernels._registry.card_name`` spells it (``"nvidia-h200"``). A device
not listed here, or a choice whose backend cannot serve the call, takes the fixed priority order
of the backends (``_registry.resolve``); so does an entry naming a backend or variant this version
lacks, with one warning. A choice's ``variant`` is passed to the launcher by name, over the
backend's module default.

No GPU has been measured yet: the sessions that built the library had none. The table is empty
until a GPU run's benchmark is tuned in (bench/README.md, "On a GPU").
"""

CARDS: dict = {}
