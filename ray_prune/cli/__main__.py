"""``python -m ray_prune.cli``: the same as the ``ray-prune`` command."""

import sys

from ray_prune.cli import main

sys.exit(main())
