"""Everything qwenrun shows: consoles and chrome (`console`), turn renderers (`render`), the
chat prompt (`prompt`) and loop (`repl`), start-up progress and questions (`progress`), and
tables (`tables`). Presentation only: nothing here decides what the program does."""
