"""CLI commands. Each module defines `register(app)` and adds its commands to the Typer app."""
