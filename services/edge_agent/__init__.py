"""The edge agent: runs on a device, installs signed model packages from edge releases (see agent.py)."""
