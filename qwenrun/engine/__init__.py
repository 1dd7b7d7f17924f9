"""llama.cpp, through llama-cpp-python: the loaded model and its context (`llama`), the values
it hands out (`values`) and its sampler chain (`sampler`); the plain values that say where
tensors go (`loadconfig`); the bindings and the ctypes pieces they lack (`native`, the only
`llama_cpp` import); what llama.cpp's log says it did (`llamalog`); the devices it has
(`devices`) and the RPC workers it may use (`rpc`, `rpcrecord`); hybrid models' context
checkpoints (`checkpoints`) and the prompt cache on disk (`promptcache`); the check of its CPU
kernels and the supervisor of a death by a signal (`crash`); `qwenrun doctor` (`doctor`) and
the commands that rebuild llama-cpp-python (`rebuild`)."""
