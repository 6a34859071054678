"""relaygw.accept."""
