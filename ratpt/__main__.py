"""`python -m ratpt …` is the same as the `ratpt` command."""
import sys

from ratpt.cli import main

sys.exit(main())
