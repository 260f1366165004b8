import sys

from example_project.demo.run import main

sys.exit(main())
