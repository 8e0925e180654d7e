"""The vocabulary every layer shares: the app and its tables, records and rows, the
error tree, typed settings and exit codes. Imports nothing else of offsetkeeper."""
