import sys

from smapws._cli import main

sys.exit(main())
