import sys

from tunneld.cli.main import main

sys.exit(main())
