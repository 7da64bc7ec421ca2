import sys

from bitalloc.cli import main

sys.exit(main())
