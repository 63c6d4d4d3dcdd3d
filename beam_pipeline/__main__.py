"""Entry point: ``python -m beam_pipeline``."""

import sys

from beam_pipeline.cli import main

sys.exit(main())
