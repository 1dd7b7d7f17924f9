"""The OpenAI-compatible server, and the client `run`/`chat --server` use.

`qwenrun serve` keeps a loaded Qwen model behind an OpenAI-style API, turning what the model
writes into OpenAI messages (thinking into `reasoning_content`, its tool calls through
`toolcalls`) and OpenAI requests back into what the model's chat template expects.

- `protocol`: OpenAI requests read into plain values; responses, chunks and errors written.
- `runner`: one request's generation on the engine thread (template, tokens, `chat.Reply`).
- `toolcalls`: Qwen's tool calls (JSON and XML forms) parsed incrementally.
- `app`: the Starlette app: endpoints, the engine's thread and queue, SSE, key, limits, log.
- `server`: binding, uvicorn on its own thread, Ctrl-C.
- `client`: a server's model as a `chat.TurnServer`, and `ps`.
"""
