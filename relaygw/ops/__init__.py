"""relaygw.ops."""
