"""`python -m duomo` runs the CLI."""

import sys

from duomo.cli import main

sys.exit(main())
