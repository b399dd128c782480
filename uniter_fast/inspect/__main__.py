"""`python -m uniter_fast.inspect`: see `uniter_fast.inspect`."""

from .cli import main

raise SystemExit(main())
