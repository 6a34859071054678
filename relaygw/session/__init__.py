"""relaygw.session."""
