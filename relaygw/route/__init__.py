"""relaygw.route."""
