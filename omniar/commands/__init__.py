"""The `omniar` subcommands that are not trainers: argument parsing and output files, on top of the API."""
