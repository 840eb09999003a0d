"""`python -m proxy` is the `faultline` command."""

from .cli import main

raise SystemExit(main())
