"""Presenting: the console while a sweep runs, the HTML and markdown reports, plots, trend pages."""
