"""relaygw.cli."""
