"""``python -m kexaone_align`` = the ``kexaone-align`` command."""

import sys

from kexaone_align.cli import main

sys.exit(main())
