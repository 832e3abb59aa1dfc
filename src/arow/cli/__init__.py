"""The command line: parses flags (built from the library's declarations), calls one library
function per command, prints, and turns failures into exit statuses."""
from .commands import main

__all__ = ["main"]
