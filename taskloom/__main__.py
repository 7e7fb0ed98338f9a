import sys

from taskloom.cli import main

sys.exit(main())
