"""Everything qwenrun shows: consoles and chrome (`console`), turn renderers (`render`), the
chat prompt (`prompt`) and loop (`repl`), start-up and bench progress and questions
(`progress`), tables (`tables`), `--help` (`helptext`) and the standard streams (`stdio`);
`talk` is `run` and `chat` around a conversation on a loaded model. Nothing here plans, loads a
model or reads the machine: it shows what the rest decided."""
