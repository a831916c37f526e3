"""``python -m service.cli``: the ``nfserve`` command."""

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
