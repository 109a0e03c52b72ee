import sys

from lvmkit.cli import main

sys.exit(main())
