"""relaygw.spool."""
