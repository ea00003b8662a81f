"""Example programs built on jaxnet (run with ``python -m jaxnet.examples.<name>``)."""
