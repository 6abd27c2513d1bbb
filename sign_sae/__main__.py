"""``python -m sign_sae``: the same commands as ``sign-sae``."""

from sign_sae.cli import main

raise SystemExit(main())
