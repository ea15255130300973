"""``python -m nsq_sync``: the nsq-sync command."""

import sys

from .cli import main

sys.exit(main())
