import sys

from treegrpo.cli import main

sys.exit(main())
