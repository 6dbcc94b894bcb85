import sys

from server.planner.cli import main

sys.exit(main())
