"""`python -m tfface` is the `tfface` command."""

from tfface.cli import main

raise SystemExit(main())
