"""`python -m lorakit` is the `lorakit` command."""

from lorakit.cli import main

raise SystemExit(main())
