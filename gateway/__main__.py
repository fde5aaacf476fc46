"""`python -m gateway` runs the same command line as `tiktok-gateway`."""

import sys

from .cli import main

sys.exit(main())
