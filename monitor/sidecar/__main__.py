"""`python -m monitor.sidecar` is `pool-monitor sidecar`."""

import sys

from monitor.sidecar.cli import main

sys.exit(main())
