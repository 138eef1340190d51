"""Not code: makes ``notebooks/conftest.py`` import as ``notebooks.conftest``, so that it does not
shadow ``tests/conftest.py`` (which the tests import as ``conftest``) when pytest runs both folders."""
