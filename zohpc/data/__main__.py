"""``python -m zohpc.data``: see :mod:`zohpc.data.cli`."""

from .cli import main

main()
