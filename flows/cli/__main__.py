"""``python -m flows.cli``: the same as the ``cxr`` console script."""

from flows.cli import main

main()
