"""Only for the peace repository, where this example is not installed: its tests are not collected
there (they test the installed plugin). Install the example (see README.md) to run them.
"""

import importlib.util

NOT_INSTALLED = importlib.util.find_spec("peace_imu") is None
SKIPPED = "examples/peace-imu/tests skipped: peace-imu is not installed"

if NOT_INSTALLED:
    collect_ignore_glob = ["tests/*"]


def pytest_report_header() -> list[str]:
    return [SKIPPED] if NOT_INSTALLED else []
