"""The test venv is what users get from ``pip install harvester[test]``."""
from __future__ import annotations

import pydicom


def test_the_test_venv_runs_pydicom_3_as_users_get_it() -> None:
    """The peers pin pydicom<3; they run from their own venv (make peers), never this one."""
    assert pydicom.__version__.startswith("3"), pydicom.__version__
