"""The engine: a plain library that backs up, restores, deletes, copies and checks."""
