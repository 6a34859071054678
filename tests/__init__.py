"""relaygw tests."""
