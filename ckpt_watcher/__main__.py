"""``python -m ckpt_watcher``: the same as the ``ckpt-watcher`` console script."""

import sys

from ckpt_watcher.console import main

sys.exit(main())
