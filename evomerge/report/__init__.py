"""The report of a run: data read from the run directory, figures, the HTML page, terminal tables.

May import anything below the CLI (it reads run directories and search spaces); nothing imports it
but the CLI."""
