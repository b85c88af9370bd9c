"""The package version, in a module of its own so that file writers can stamp it.

``zohpc/__init__.py`` loads the script API (:mod:`zohpc.api`) on first use; a module that
only needs the version imports it from here and stays below the API in the import order.
"""

__version__ = "0.1.0"
