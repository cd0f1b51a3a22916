"""``python -m lens`` runs the ``lens`` command line (the same as the ``lens`` console script)."""

import sys

from lens.cli import main

if __name__ == "__main__":
    sys.exit(main())
