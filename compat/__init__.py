"""The compatibility job: SQLAlchemy's own test suite, bare and with every engine instrumented.

`compat.run` drives it; `compat.plugin` is the pytest plugin loaded into those runs. The
library (`monitor/`) never imports this package.
"""
