"""`python -m metta_collapse`: the `metta-collapse` command."""

import sys

from metta_collapse.cli import main

sys.exit(main())
