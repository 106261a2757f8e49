"""Readers for every kind of source the collect stage knows: markup and record files, databases, the web."""
