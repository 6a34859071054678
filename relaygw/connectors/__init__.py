"""relaygw.connectors."""
