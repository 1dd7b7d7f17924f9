"""llama.cpp, through llama-cpp-python: the loaded model and its context (`llama`), the plain
values that say where tensors go (`loadconfig`), the bindings and the ctypes pieces they lack
(`native`, the only `llama_cpp` import), and what llama.cpp's log says it did (`llamalog`)."""
