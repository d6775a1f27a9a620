"""Data building blocks the families share: CSV reading, splits, image decoding, series
cleaning and windows, and the prepared-data contract (prepared.py). Each family's prepare
(families/<name>.py) calls the module for its kind of data."""
