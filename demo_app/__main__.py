"""`python -m demo_app [flags]`: the same as `pool-monitor demo [flags]`."""

import sys

from demo_app.runner import main

sys.exit(main())
