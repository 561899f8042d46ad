"""Test-only helpers: reference implementations, fakes of external programs, a browser driver."""
