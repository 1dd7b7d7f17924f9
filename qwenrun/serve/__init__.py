"""The OpenAI-compatible server, and the client `run`/`chat --server` use.

`qwenrun serve` keeps a loaded Qwen model behind an OpenAI-style API, turning what the model
writes into OpenAI messages (thinking into `reasoning_content`, its tool calls through
`toolcalls`) and OpenAI requests back into what the model's chat template expects.

- `protocol`: OpenAI requests read into plain values; responses, chunks and errors written.
- `runner`: one request's generation on the engine thread (template, tokens, `chat.Reply`).
- `toolcalls`: Qwen's tool calls (JSON and XML forms) parsed incrementally, with
  `toolcalls_xml` (one XML function body) and `toolcalls_values` (tools, schemas, typed values).
- `answer_router`: which text is thinking and which the answer when a call is written inside
  the thinking.
- `app`: the Starlette app: routes, exception handlers, the guard (API key, body size, log).
- `endpoints`: one handler per endpoint; `state`: the server's model, worker, key and limits.
- `enginethread`: the one thread that uses the engine (`Worker`) and its bounded queue.
- `replies`: a generation as OpenAI's streamed chunks or whole body; `sse`: the event stream.
- `apierror`: every failure as a status and OpenAI's error body.
- `server`: binding, uvicorn on its own thread, Ctrl-C.
- `client`: a server's model as a `chat.TurnServer`, and `ps`.
"""
