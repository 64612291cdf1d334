"""Python 3.6 compatibility for the test helpers, in one place.

The suite runs under CPython 3.6-3.13 and PyPy (``make test``); what the
oldest of them lacks is defined here once.  (The in-process HTTP servers
share httpdouble.Listener, which is 3.6-ready: no ThreadingHTTPServer.)
"""

import time

try:
    from time import monotonic_ns
except ImportError:  # Python 3.6
    def monotonic_ns():
        return int(time.monotonic() * 1e9)
