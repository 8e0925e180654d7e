"""Example apps shipped with offsetkeeper."""
