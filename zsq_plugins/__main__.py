import sys

from zsq_plugins.cli import main

sys.exit(main())
