"""Command-line tools around training runs (``python -m jaxedit.tools.<name>``)."""
