"""The offload planner's insides (its face is `qwenrun.offload`): facts of a GGUF (`facts`),
what llama.cpp allocates (`costs`), how fast it runs (`speed`), quant recipes and size
estimates (`recipes`), the search over contexts and placements (`search`), and the words
(`explain`)."""
