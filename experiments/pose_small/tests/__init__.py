"""Tests of the small reproduction (collected by the suite: pytest.ini's testpaths)."""
