import sys

from ray_prune.cli import main

sys.exit(main())
