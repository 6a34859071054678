"""relaygw.deliver."""
