"""Run the simulator: ``python -m scaiproxy.simulator --port 8701``."""

import sys

from scaiproxy.simulator import main

sys.exit(main(prog="python -m scaiproxy.simulator"))
