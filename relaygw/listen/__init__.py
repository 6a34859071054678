"""relaygw.listen."""
