import sys

from us3d.cli import main

sys.exit(main())
