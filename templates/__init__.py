"""jitkern's built-in kernel templates (one folder per op). Installed as the package
``jitkern._templates`` (see pyproject's package-dir) so that ``importlib.resources`` finds them."""
