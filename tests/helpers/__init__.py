"""Test helpers: fixtures, fakes and NumPy references shared by the test files."""
