"""The test kit, apart from the program: a loopback hub (`hub_server`), `qwenrun` run as a real
process (`proc`), a real server in this process (`served`), real `qwenrun worker`s and an RPC
client process (`workers`, `rpc_client`), hypothetical machines as values (`hardware`) and the
H200 measurements (`h200`). Tests and benchmarks import it; nothing outside `qwenrun/testing/`
does."""
