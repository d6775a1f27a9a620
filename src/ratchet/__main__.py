"""`python -m ratchet ...` is the `ratchet` command (torchrun launches it this way)."""

import sys

from ratchet.cli import main

sys.exit(main())
