"""``python -m stapsrv`` is the ``stap-server`` manager."""

import sys

from stapsrv.cli.manager import main

sys.exit(main())
