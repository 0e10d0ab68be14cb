import sys

from emr_job.main import main

sys.exit(main())
