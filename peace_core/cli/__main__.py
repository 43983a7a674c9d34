"""``python -m peace_core.cli``: the same as the ``peace`` console script."""

from peace_core.cli import main

raise SystemExit(main())
