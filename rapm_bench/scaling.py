"""`python -m rapm_bench.scaling` (also `rapm-bench scaling`): its home is rapm_bench.perf.scaling.

This name stays for the command, the worker processes it launches and `from rapm_bench import scaling`:
importing it gives the perf.scaling module itself (so a test's monkeypatch reaches the code that runs).
"""

from __future__ import annotations

import sys

from .perf import scaling as _scaling

if __name__ == "__main__":
    _scaling.main()
else:
    sys.modules[__name__] = _scaling
