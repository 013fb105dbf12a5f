"""``python -m pipelines.evaluation eval|compare|build-tasks ...`` (the ``ift eval`` / ``ift compare`` commands)."""

import sys

from pipelines.evaluation.cli import main

sys.exit(main())
