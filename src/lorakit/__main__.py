"""``python -m lorakit`` (what ``torchrun -m lorakit`` runs)."""

import sys

from lorakit.cli import main

sys.exit(main())
