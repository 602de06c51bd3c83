"""``python -m jitkern`` = the ``jitkern`` command."""
import sys

from .cli import main

sys.exit(main())
