"""relaygw.auth."""
