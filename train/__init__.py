"""Thin entry points: parse a typed config, build, run the library's loop."""
